"""Pairs in other trainers' dataset formats, so a user can train on alignkit's pairs elsewhere.

`llamafactory`: LLaMA-Factory's sharegpt preference format with images (`conversations`, `chosen`,
`rejected`, `images`; github.com/hiyouga/LLaMA-Factory data/README.md and its `rlhf_v` entry), a JSON
array plus the `dataset_info.json` entry that names its columns and tags. `swift`: ms-swift's RLHF
format (`messages` ending in the chosen answer, `rejected_response`, `images`; ms-swift docs,
Customization/Custom-dataset.md), jsonl. Each image is copied once into `OUT/images/` under its
content hash, and records name it relative to OUT; each prompt's images stand as `<image>` tags
where they were in the user turn. Files are written atomically; a re-run copies only missing images.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from alignkit.errors import RecordError
from alignkit.records import Pair, atomic_output, file_digest, iter_jsonl, read_records, write_atomic, write_jsonl
from alignkit.stage import RunPaths

TARGETS: tuple[str, ...] = ("llamafactory", "swift")
IMAGE_TAG = "<image>"  # both tools' image placeholder
SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}  # LLaMA-Factory's default tags
LLAMAFACTORY_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                     "system_tag": "system"}  # fmt: skip


def pairs_file(source: Path) -> Path:
    """The pairs file named by `source`: a pairs jsonl, or a run (or round-<r>) directory holding one."""
    path = RunPaths(source).pairs if source.is_dir() else source
    if not path.is_file():
        where = (
            f"{source} holds no pairs.jsonl (run `alignkit pairs RECIPE` first)"
            if source.is_dir()
            else f"{source}: no such file"
        )
        raise RecordError(f"{where}; expected a run directory or a pairs jsonl")
    return path


def _text(turn: Any, where: str) -> tuple[str, str]:
    """(role, text) of one turn of TRL's conversational format; images become `<image>` tags in place."""
    if not isinstance(turn, dict) or not isinstance(turn.get("content"), list) or "role" not in turn:
        raise RecordError(f"{where}: a turn must be an object with 'role' and a 'content' list, got {turn!r:.80}")
    parts = []
    for item in turn["content"]:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "image":
            parts.append(IMAGE_TAG)
        elif kind == "text" and isinstance(item.get("text"), str):
            parts.append(item["text"])
        else:
            raise RecordError(
                f"{where}: content items are {{'type': 'image'}} or {{'type': 'text', 'text': ...}}, got {item!r:.80}"
            )
    return turn["role"], "".join(parts)


def _turns(value: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise RecordError(f"{where}: expected a non-empty list of turns, got {value!r:.80}")
    return [_text(t, where) for t in value]


def _answer(value: Any, where: str) -> str:
    turns = _turns(value, where)
    if len(turns) != 1 or turns[0][0] != "assistant" or IMAGE_TAG in turns[0][1]:
        raise RecordError(f"{where}: expected one assistant turn of text")
    return turns[0][1]


def read_pairs(path: Path) -> list[tuple[str, Pair]]:
    """The pairs of a pairs jsonl, each with where it is (`file:line (pair_id=...)`), checked for what an
    export needs: conversational turns, a user turn last in the prompt, as many images as `<image>` tags."""
    pairs = read_records(path, Pair)
    out = []
    for (lineno, _), pair in zip(iter_jsonl(path), pairs):
        where = f"{path}:{lineno} (pair_id={pair.pair_id})"
        prompt = _turns(pair.prompt, f"{where} prompt")
        if prompt[-1][0] != "user" or any(role not in SHAREGPT_ROLES for role, _ in prompt):
            raise RecordError(f"{where}: the prompt's turns are user/assistant/system and end with a user turn")
        _answer(pair.chosen, f"{where} chosen")
        _answer(pair.rejected, f"{where} rejected")
        if not isinstance(pair.images, list) or not all(isinstance(i, str) for i in pair.images):
            raise RecordError(f"{where}: 'images' must be a list of image paths")
        tags = sum(text.count(IMAGE_TAG) for _, text in prompt)
        if tags != len(pair.images):
            raise RecordError(f"{where}: the prompt has {tags} image item(s) but 'images' lists {len(pair.images)}")
        out.append((where, pair))
    return out


def _copy_images(pairs: list[tuple[str, Pair]], base: Path, out_dir: Path) -> dict[str, str]:
    """Copy every image once into `out_dir/images/` under its content hash; map each reference (as
    written in the pairs, relative ones against the pairs file's directory) to its path under `out_dir`."""
    copied: dict[str, str] = {}
    for where, pair in pairs:
        for ref in pair.images:
            if ref in copied:
                continue
            src = base / ref
            if not src.is_file():
                raise RecordError(f"{where}: image {ref!r} not found ({src})")
            rel = f"images/{file_digest(src)[:20]}{src.suffix.lower()}"
            if not (out_dir / rel).is_file():
                with atomic_output(out_dir / rel) as tmp:
                    shutil.copyfile(src, tmp)
            copied[ref] = rel
    return copied


def llamafactory_record(pair: Pair, images: list[str]) -> dict[str, Any]:
    """One pair in LLaMA-Factory's sharegpt preference format."""
    conversations = [{"from": SHAREGPT_ROLES[role], "value": text} for role, text in _turns(pair.prompt, "")]
    return {
        "conversations": conversations,
        "chosen": {"from": "gpt", "value": _answer(pair.chosen, "")},
        "rejected": {"from": "gpt", "value": _answer(pair.rejected, "")},
        "images": images,
    }


def llamafactory_entry(file_name: str) -> dict[str, Any]:
    """The `dataset_info.json` entry LLaMA-Factory needs to read `file_name` as a multimodal preference set."""
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"},
        "tags": LLAMAFACTORY_TAGS,
    }


def swift_record(pair: Pair, images: list[str]) -> dict[str, Any]:
    """One pair in ms-swift's RLHF format: the conversation ends with the chosen answer."""
    messages = [{"role": role, "content": text} for role, text in _turns(pair.prompt, "")]
    messages.append({"role": "assistant", "content": _answer(pair.chosen, "")})
    return {"messages": messages, "rejected_response": _answer(pair.rejected, ""), "images": images}


def _merge_dataset_info(path: Path, name: str, entry: dict[str, Any]) -> None:
    """Add (or replace) `name` in LLaMA-Factory's `dataset_info.json`, keeping the other datasets there."""
    info: dict[str, Any] = {}
    if path.is_file():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecordError(
                f"{path}: an existing dataset_info.json that is not valid JSON ({e}); fix or remove it"
            ) from None
        if not isinstance(info, dict):
            raise RecordError(f"{path}: an existing dataset_info.json that is not a JSON object; fix or remove it")
    info[name] = entry
    write_atomic(path, json.dumps(info, indent=2, ensure_ascii=False) + "\n")


def export_pairs(source: Path, target: str, out_dir: Path, name: str = "alignkit_pairs") -> dict[str, Any]:
    """Write the pairs of `source` (a run directory or a pairs jsonl) into `out_dir` in `target`'s
    format, images copied; returns what was written."""
    if target not in TARGETS:
        raise RecordError(f"unknown export target {target!r}; choose one of {TARGETS}")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise RecordError(f"dataset name {name!r}: use letters, digits, '_', '-' and '.' (it names a file in OUT)")
    path = pairs_file(Path(source))
    pairs = read_pairs(path)
    out_dir = Path(out_dir)
    copied = _copy_images(pairs, path.parent, out_dir)
    if target == "llamafactory":
        data = out_dir / f"{name}.json"
        records = [llamafactory_record(p, [copied[i] for i in p.images]) for _, p in pairs]
        write_atomic(data, json.dumps(records, indent=1, ensure_ascii=False) + "\n")
        _merge_dataset_info(out_dir / "dataset_info.json", name, llamafactory_entry(data.name))
    else:
        data = write_jsonl(
            out_dir / f"{name}.jsonl", [swift_record(p, [copied[i] for i in p.images]) for _, p in pairs]
        )
    return {"pairs": len(pairs), "images": len(set(copied.values())), "file": str(data)}
