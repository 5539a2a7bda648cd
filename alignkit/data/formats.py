"""Dataset adapters: prompts and preference pairs from the formats public VLM datasets come in.

- `alignkit`: alignkit's own prompts (`prompt_id`, `question`, `images` or `image`, gold fields).
- `rlaif-v`: openbmb/RLAIF-V-Dataset (`question`, `chosen`, `rejected`, `image` as a `datasets`
  Image dict; its `ds_name`, `origin_dataset`, `origin_split`, `idx`, `image_path` are not needed).
- `vlfeedback`: MMInstruction/VLFeedback (`prompt`, `img_path` or `image`, `completions`: per model
  a `response` and `annotations` as `{aspect: {"Rating": ..., "Rationale": ...}}`; a list of
  records, or a record of lists as `datasets` stores it).
- `llava`: LLaVA instruction JSON (`conversations` of `{"from": "human"|"gpt", "value": ...}` with
  `<image>` tokens; `image` a path).
- `trl`: TRL's prompt-only (`prompt`, `images`) and preference (`prompt`, `chosen`, `rejected`,
  `images`) datasets, as strings or conversations. alignkit's own pairs files are in this format.
- `sharegpt`: `messages` of `{"role", "content"}` with `<image>` tokens; `images`.

Prompts come from every format: the first user turn, with the answer after it (where there is one)
as the reference answer. Pairs come from `rlaif-v`, `vlfeedback` (the best against the worst
completion by mean rating over the aspects, as the Silkie paper builds its DPO pairs) and `trl`
preference rows. Prompts in every format but alignkit's get their id from their content (question
and image file names), so a file's prompts and its pairs share ids, and a question asked of one
image twice (RLAIF-V holds several pairs per prompt) is one prompt.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Any, Iterator

from alignkit.errors import RecordError
from alignkit.records import Prompt, _prompt_from_row, image_files, iter_rows

FORMATS = ("alignkit", "rlaif-v", "vlfeedback", "llava", "trl", "sharegpt")
PAIR_FORMATS = ("rlaif-v", "vlfeedback", "trl")
# The columns that tell each format, tried in this order: every alignkit prompt has its id,
# VLFeedback rows also have `prompt`, and RLAIF-V rows also have `question`.
SIGNATURES = (
    ("alignkit", frozenset({"prompt_id"})),
    ("vlfeedback", frozenset({"prompt", "completions"})),
    ("llava", frozenset({"conversations"})),
    ("sharegpt", frozenset({"messages"})),
    ("rlaif-v", frozenset({"question", "chosen", "rejected"})),
    ("trl", frozenset({"prompt"})),
)
IMAGE_TOKEN = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

Rows = Iterator[tuple[str, dict[str, Any]]]


def detect(source: Path, rows: Rows, format: str = "auto") -> tuple[str, Rows]:
    """The format of a file (`format`, checked, or told from its first row's columns) and its rows."""
    first = next(rows, None)
    if first is None:  # an empty file: the caller says there is nothing in it
        return ("alignkit" if format == "auto" else format), iter(())
    columns = set(first[1])
    needs = dict(SIGNATURES)
    if format == "auto":
        fmt = next((name for name, cols in SIGNATURES if cols <= columns), None)
        if fmt is None:
            expected = "; ".join(f"{name}: {', '.join(sorted(cols))}" for name, cols in SIGNATURES)
            raise RecordError(f"{source}: cannot tell its format from its columns {sorted(columns)}; each format "
                              f"needs these columns ({expected})")  # fmt: skip
    elif format not in needs:
        raise RecordError(f"{source}: unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    else:
        fmt = format
        if missing := needs[fmt] - columns:
            raise RecordError(f"{source}: the {fmt} format needs column(s) {sorted(missing)}; found {sorted(columns)}")
    return fmt, itertools.chain([first], rows)


def _get(row: dict[str, Any], key: str, where: str) -> Any:
    if row.get(key) is None:
        raise RecordError(f"{where}: missing {key!r}")
    return row[key]


def _text(value: Any, where: str) -> str:
    """A message's text: a string, or the text parts of a list of parts; `<image>` tokens removed
    (the images come from the record's image column, placed by alignkit's own template)."""
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        value = "\n".join(p["text"] for p in value if p.get("type") == "text" and isinstance(p.get("text"), str))
    if not isinstance(value, str):
        raise RecordError(f"{where}: expected text or a list of content parts, got {type(value).__name__}")
    return value.replace(IMAGE_TOKEN, "").strip()


def _turns(messages: Any, where: str, role_key: str = "role", content_key: str = "content") -> list[tuple[str, str]]:
    """A conversation as (user | assistant | system, text) turns."""
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{where}: expected a non-empty list of messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get(role_key) not in ROLES or content_key not in m:
            raise RecordError(
                f"{where}[{i}]: a message needs {role_key!r} (one of {', '.join(ROLES)}) and {content_key!r}"
            )
        turns.append((ROLES[m[role_key]], _text(m[content_key], f"{where}[{i}]")))
    return turns


def _first_exchange(turns: list[tuple[str, str]], where: str) -> tuple[str, str | None]:
    """The first user turn's text and the answer after it, if any."""
    for i, (role, text) in enumerate(turns):
        if role == "user":
            answer = turns[i + 1][1] if i + 1 < len(turns) and turns[i + 1][0] == "assistant" else None
            return text, answer
    raise RecordError(f"{where}: no user turn in the conversation")


def _images(row: dict[str, Any], *keys: str) -> Any:
    return next((row[k] for k in keys if row.get(k) is not None), None)


def _question(fmt: str, row: dict[str, Any], where: str) -> tuple[str, Any, str | None]:
    """One row's question, its raw image value(s) and its reference answer (if the row has one)."""
    if fmt == "rlaif-v":
        question, images, answer = _text(_get(row, "question", where), f"{where}: question"), row.get("image"), None
    elif fmt == "vlfeedback":
        question, images, answer = (
            _text(_get(row, "prompt", where), f"{where}: prompt"),
            _images(row, "image", "img_path"),
            None,
        )
    elif fmt == "llava":
        turns = _turns(_get(row, "conversations", where), f"{where}: conversations", "from", "value")
        (question, answer), images = _first_exchange(turns, where), row.get("image")
    elif fmt == "sharegpt":
        (question, answer), images = (
            _first_exchange(_turns(_get(row, "messages", where), f"{where}: messages"), where),
            _images(row, "images", "image"),
        )
    else:  # trl
        prompt = _get(row, "prompt", where)
        question = (
            _text(prompt, f"{where}: prompt")
            if isinstance(prompt, str)
            else _first_exchange(_turns(prompt, f"{where}: prompt"), where)[0]
        )
        images, answer = _images(row, "images", "image"), None
    if not question:
        raise RecordError(f"{where}: empty question")
    return question, images, answer


def content_id(question: str, images: list[str]) -> str:
    """A prompt id from the question and its images' file names (embedded images are named by
    their content hash), the same on every machine."""
    h = hashlib.sha256(question.encode())
    for path in images:
        h.update(b"\0" + Path(path).name.encode())
    return h.hexdigest()[:16]


def prompt_from(fmt: str, row: dict[str, Any], base_dir: Path, image_dir: Path, where: str, outside: bool) -> Prompt:
    """One row of a format other than alignkit's as a Prompt (images stored as files, see `read_prompts`)."""
    question, images, answer = _question(fmt, row, where)
    files = image_files(images, base_dir, image_dir, where, outside)
    return Prompt(prompt_id=content_id(question, files), question=question, images=files, reference_answer=answer)


# ---------------------------------------------------------------------------------------------
# pairs


def read_prompts(
    source: str | Path, image_dir: str | Path, allow_outside_paths: bool = False, format: str = "auto"
) -> list[Prompt]:
    """Read prompts from a jsonl, JSON or parquet file, a saved `datasets` directory, or a cached
    Hub dataset (`hf:owner/name[:split]`, see `iter_rows`).

    `format` names the file's layout (`alignkit.data.formats`: alignkit's own, RLAIF-V, VLFeedback,
    LLaVA, TRL, ShareGPT); `auto` tells it from the columns. Images may be paths (relative to the
    file, and inside its directory unless `allow_outside_paths`), bytes, base64 data URLs,
    `datasets` Image dicts or PIL images; embedded images are written to `image_dir` so every
    record carries paths. Duplicate prompt ids are an error, since every later stage joins on them
    (prompts of other formats get ids from their content, and repeats of one are kept once); so is
    a source with no prompts.
    """
    source, image_dir = Path(source), Path(image_dir)
    base, rows = iter_rows(source, "prompts")
    fmt, rows = detect(source, rows, format)
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for where, row in rows:
        if fmt == "alignkit":
            p = _prompt_from_row(row, base, image_dir, where, allow_outside_paths)
            if p.prompt_id in seen:
                raise RecordError(f"{where}: duplicate prompt_id {p.prompt_id!r}")
        else:
            p = prompt_from(fmt, row, base, image_dir, where, allow_outside_paths)
            if p.prompt_id in seen:
                continue
        seen.add(p.prompt_id)
        prompts.append(p)
    if not prompts:
        raise RecordError(f"{source}: no prompts in it")
    return prompts
