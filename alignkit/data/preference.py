"""Reading a pairs file into the `datasets.Dataset` that TRL's `DPOTrainer` trains on.

A pairs line is TRL's conversational preference format (`prompt`, `chosen`, `rejected` as lists
of messages, `images` as file paths) plus alignkit's extras (ids, scores, margin, rationales),
which are dropped here unless asked for (`keep`: MM-DPO needs `pair_id` and a margin). Bad data
fails here, naming file and line, rather than deep inside the collator in the middle of training.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignkit.records import RecordError, iter_jsonl

if TYPE_CHECKING:
    from datasets import Dataset

COLUMNS = ("prompt", "chosen", "rejected", "images")


def _content_parts(content: Any, where: str) -> list[dict[str, Any]]:
    """Message content as a list of `{"type": "text", "text": ...}` / `{"type": "image"}` parts."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RecordError(f"{where}: content must be a string or a list of parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            # A placeholder: the images themselves come from the `images` column, in order.
            parts.append({"type": "image"})
        else:
            raise RecordError(f"{where}: content parts must be {{'type': 'text', 'text': str}} or {{'type': 'image'}}")
    return parts


def _messages(value: Any, where: str, num_images: int = 0) -> list[dict[str, Any]]:
    """Normalise a conversation; like TRL, a first user message given as a string gets the images."""
    if not isinstance(value, list) or not value:
        raise RecordError(f"{where}: expected a non-empty list of messages")
    messages = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise RecordError(f"{where}[{i}]: a message needs 'role' and 'content'")
        parts = _content_parts(msg["content"], f"{where}[{i}]")
        if num_images and msg["role"] == "user" and isinstance(msg["content"], str):
            parts = [{"type": "image"}] * num_images + parts
            num_images = 0
        messages.append({"role": msg["role"], "content": parts})
    return messages


def preference_row(
    obj: dict[str, Any], base_dir: Path, where: str, keep: Mapping[str, type | tuple[type, ...]]
) -> dict[str, Any]:
    """One pairs-file line checked and normalised (image paths made absolute), or a RecordError naming `where`."""
    missing = [k for k in (*COLUMNS, *keep) if k not in obj]
    if missing:
        raise RecordError(f"{where}: missing key(s) {missing} for a preference pair")
    if not isinstance(obj["images"], list) or not all(isinstance(p, str) for p in obj["images"]):
        raise RecordError(f"{where}: 'images' must be a list of image file paths")
    images = [str(base_dir / p) for p in obj["images"]]  # relative paths are relative to the pairs file
    for p in images:
        if not Path(p).is_file():
            raise RecordError(f"{where}: image file not found: {p}")
    prompt = _messages(obj["prompt"], f"{where}: prompt", num_images=len(images))
    placeholders = sum(part["type"] == "image" for m in prompt for part in m["content"])
    if placeholders != len(images):
        raise RecordError(f"{where}: the prompt has {placeholders} image placeholder(s) for {len(images)} image(s)")
    for key, kind in keep.items():
        if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise RecordError(f"{where}: {key!r} must be {names}, got {obj[key]!r}")
    return {
        "prompt": prompt,
        "chosen": _messages(obj["chosen"], f"{where}: chosen"),
        "rejected": _messages(obj["rejected"], f"{where}: rejected"),
        "images": images,
        **{key: obj[key] for key in keep},
    }


def load_preference_dataset(path: str | Path, keep: Mapping[str, type | tuple[type, ...]] | None = None) -> Dataset:
    """The pairs file as a `Dataset` with columns prompt/chosen/rejected/images (decoded as RGB PIL).

    `keep` maps extra keys to keep as columns to their required type, e.g. `{"margin": (int, float)}`.
    """
    import datasets

    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: pairs file not found")
    rows = [preference_row(obj, path.parent, f"{path}:{lineno}", keep or {}) for lineno, obj in iter_jsonl(path)]
    if not rows:
        raise RecordError(f"{path}: no preference pairs (the file is empty)")
    ds = datasets.Dataset.from_list(rows)
    return ds.cast_column("images", datasets.List(datasets.Image(mode="RGB")))
