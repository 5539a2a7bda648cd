"""Encoded training examples on disk: encoded once, memory-mapped while a loop trains on them.

SFT and the reward model need every example encoded before their first step (its length for the
context check, its completion tokens for the global batch's loss normalisation), and then one
batch at a time. Held in memory, that is every example's pixel values in every process: about
5 MB per 448-px Qwen2-VL image, 48 GB per process for 10,000 examples. Instead, the processes
encode shards of examples in turn (shard s by process s mod N) into safetensors files, written
atomically, and every process reads examples back through safetensors' memory map, so the
operating system's page cache holds them once for all processes and only a batch is in memory.
A re-run with the same settings (data and processor) keeps the finished shards: a killed encode
resumes where it stopped. The directory is for one run; its owner removes it when training ends.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from alignkit.models.checkpoint import run_key
from alignkit.models.inputs import Features
from alignkit.records import atomic_output, write_atomic

SHARD_SIZE = 64
"""Examples per shard file: the unit of work a kill can lose."""
OPEN_SHARDS = 16
"""Shard files a reader keeps open (a shuffled epoch touches them all)."""


class EncodedExamples(Sequence[tuple[Features, ...]]):
    """Example i as the tuple of feature dicts it was encoded as (read from the shard files)."""

    def __init__(self, directory: Path, count: int, shard_size: int = SHARD_SIZE) -> None:
        self.directory, self.count, self.shard_size = Path(directory), count, shard_size
        self._open: OrderedDict[int, tuple[Any, dict[int, list[str]]]] = OrderedDict()  # shard: (file, names)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[Features, ...]:  # type: ignore[override]
        return self.get(i)

    def get(self, i: int, keys: Sequence[str] | None = None) -> tuple[Features, ...]:
        """Example i's feature dicts, only `keys` of each when given (no pixel values read)."""
        if not 0 <= i < self.count:
            raise IndexError(f"example {i} of {self.count}")
        shard, j = divmod(i, self.shard_size)
        handle, names = self._shard(shard)
        parts: dict[int, Features] = {}
        for name in names[j]:
            _, part, key = name.split("/", 2)
            if keys is None or key in keys:
                parts.setdefault(int(part), {})[key] = handle.get_tensor(name)
        return tuple(parts[p] for p in sorted(parts))

    def _shard(self, shard: int) -> tuple[Any, dict[int, list[str]]]:
        """The shard's open file and its tensor names by example; the last few shards stay open
        (tensors already read stay valid when a file is closed)."""
        if shard not in self._open:
            from safetensors import safe_open

            handle = safe_open(str(_shard_path(self.directory, shard)), framework="pt")
            names: dict[int, list[str]] = {}
            for name in handle.keys():
                names.setdefault(int(name.split("/", 1)[0]), []).append(name)
            self._open[shard] = handle, names
            if len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)
        self._open.move_to_end(shard)
        return self._open[shard]


def _shard_path(directory: Path, shard: int) -> Path:
    return directory / f"shard-{shard:06d}.safetensors"


def encode_to_disk(
    directory: Path,
    items: Sequence[Any],
    encode_one: Callable[[Any], tuple[Features, ...]],
    settings: Any,
    *,
    progress: Callable[[int], Any] | None = None,
    shard_size: int = SHARD_SIZE,
) -> EncodedExamples:
    """Encode `items` with `encode_one` into `directory` (or keep what a run with the same `settings`,
    JSON-able: data digest, processor, options, left there) and return them memory-mapped. Run it
    in every process of a launch: each encodes its share of the shards, and all return once every
    shard is written. `directory` must be shared by the processes (the stage's output directory).
    `progress(n)` makes the bar (`update`, `close`) for this process's n examples still to encode."""
    from alignkit.models.device import process_state

    state = process_state()
    directory = Path(directory)
    key_file, key = directory / "key.json", {"key": run_key(settings), "count": len(items), "shard_size": shard_size}
    if state.is_main_process:
        found = json.loads(key_file.read_text(encoding="utf-8")) if key_file.is_file() else None
        if found != key:
            shutil.rmtree(directory, ignore_errors=True)  # another run's encodings: start over
            directory.mkdir(parents=True)
            write_atomic(key_file, json.dumps(key))
    state.wait_for_everyone()
    shards = range(state.process_index, -(-len(items) // shard_size), state.num_processes)
    todo = [s for s in shards if not _shard_path(directory, s).is_file()]
    bar = progress(sum(len(items[s * shard_size :][:shard_size]) for s in todo)) if progress else None
    for s in todo:
        tensors = {}
        for j, item in enumerate(items[s * shard_size :][:shard_size]):
            for part, features in enumerate(encode_one(item)):
                tensors.update({f"{j}/{part}/{k}": v.contiguous().clone() for k, v in features.items()})
            if bar:
                bar.update(1)
        _write_shard(_shard_path(directory, s), tensors)
    if bar:
        bar.close()
    state.wait_for_everyone()
    return EncodedExamples(directory, len(items), shard_size)


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp))
