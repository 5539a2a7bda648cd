"""The on-disk cache of reference log-probabilities that lets MM-DPO run one forward per step.

TRL refuses `precompute_ref_log_probs` for vision datasets, so alignkit computes the reference
log-probs of every pair once, before training, and appends them to a jsonl file in the run
directory. The file name is a fingerprint of the reference model (weights, dtype, 4-bit loading,
truncation), and each line is keyed by the pair's id plus a digest of its text and images, so a
pairs file regenerated under the same ids never reuses a stale value. A torn last line (a kill)
is ignored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image


def reference_fingerprint(model_path: str, **settings: Any) -> str:
    """A short hash of the reference model: its path, its files' names/sizes/mtimes, and `settings`.

    File stats rather than content hashes: hashing tens of GB of weights would cost more than the
    forward passes the cache saves. A hub id is fingerprinted by its name.
    """
    path = Path(model_path)
    files = sorted(path.iterdir()) if path.is_dir() else []
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    blob = json.dumps({"model": model_path, "files": stats, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pair_key(pair_id: str, prompt: Any, chosen: Any, rejected: Any, images: Sequence[Image.Image]) -> str:
    """`pair_id` plus a digest of the pair's conversations and its images' pixels: a pairs file
    regenerated with other images under the same ids and file names gets new keys."""
    h = hashlib.sha256(json.dumps([prompt, chosen, rejected], sort_keys=True).encode())
    for image in images:
        h.update(f"{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
    return f"{pair_id}:{h.hexdigest()[:16]}"


def read_cache(path: Path) -> dict[str, tuple[float, float]]:
    """Key -> (chosen, rejected) reference log-probs from the complete lines of `path`."""
    cached: dict[str, tuple[float, float]] = {}
    if not path.exists():
        return cached
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # torn by a kill
        obj = json.loads(line)
        cached[obj["key"]] = (obj["chosen"], obj["rejected"])
    return cached


def append_cache(path: Path, keys: list[str], chosen: list[float], rejected: list[float]) -> None:
    """Append one batch of reference log-probs, flushed so a kill loses at most this batch."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for key, c, r in zip(keys, chosen, rejected, strict=True):
            f.write(json.dumps({"key": key, "chosen": c, "rejected": r}) + "\n")
