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
import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from alignkit.errors import RecordError
from alignkit.records import Pair, Prompt, image_files, iter_rows, to_dict

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


def _completions(value: Any, where: str) -> list[dict[str, Any]]:
    """VLFeedback's completions as a list of records, from a list or from a record of lists."""
    if isinstance(value, dict):
        keys = list(value)
        if not all(isinstance(value[k], list) for k in keys) or len({len(value[k]) for k in keys}) > 1:
            raise RecordError(f"{where}: 'completions' as a record must hold lists of one length")
        value = [dict(zip(keys, vals)) for vals in zip(*(value[k] for k in keys))]
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        raise RecordError(f"{where}: 'completions' must be a list of records with 'response' and 'annotations'")
    return value


def _mean_rating(annotations: Any) -> float | None:
    """The mean of the numeric aspect ratings (VLFeedback stores them as strings; "N/A" is left out)."""
    ratings = []
    for aspect in (annotations or {}).values():
        try:
            ratings.append(float(aspect["Rating"]))
        except (TypeError, KeyError, ValueError):
            continue
    return sum(ratings) / len(ratings) if ratings else None


def _rationale(annotations: Any) -> str:
    return "; ".join(f"{name}: {a.get('Rating')}, {a.get('Rationale', '')}".rstrip(", ")
                     for name, a in (annotations or {}).items() if isinstance(a, dict))  # fmt: skip


def _scored(row: dict[str, Any], where: str) -> tuple[Any, Any, float, float, str, str] | str:
    """VLFeedback: the best and the worst completion by mean rating (first in order on ties), with
    their ratings and rationales; or why the row gives no pair."""
    rated = [(c, m) for c in _completions(_get(row, "completions", where), where)
             if (m := _mean_rating(c.get("annotations"))) is not None and isinstance(c.get("response"), str)]  # fmt: skip
    if len(rated) < 2:
        return "rows with fewer than two rated completions"
    best = max(range(len(rated)), key=lambda i: (rated[i][1], -i))
    worst = min(range(len(rated)), key=lambda i: (rated[i][1], i))
    (bc, bm), (wc, wm) = rated[best], rated[worst]
    if bm == wm:
        return "rows whose completions are all rated the same"
    return bc["response"], wc["response"], bm, wm, _rationale(bc.get("annotations")), _rationale(wc.get("annotations"))


def _number(row: dict[str, Any], keys: tuple[str, ...], default: float, where: str) -> float:
    value = next((row[k] for k in keys if row.get(k) is not None), default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RecordError(f"{where}: {keys[0]!r} must be a number, got {value!r}")
    return float(value)


def pair_from(fmt: str, row: dict[str, Any], base_dir: Path, image_dir: Path, where: str, outside: bool) -> Pair | str:
    """One row's preference pair, or the reason it gives none (a tie, too few rated completions).

    Pairs without scores of their own (RLAIF-V, TRL) score 1 against 0: a preference, margin 1.
    """
    from alignkit.data.preference import _messages
    from alignkit.pairs import _conversation

    question, images, _ = _question(fmt, row, where)
    files = image_files(images, base_dir, image_dir, where, outside)
    prompt = _conversation("user", question, len(files))
    rationales = ("", "")
    if fmt == "vlfeedback":
        scored = _scored(row, where)
        if isinstance(scored, str):
            return scored
        chosen, rejected, chosen_score, rejected_score, *rationales = scored
    else:
        chosen, rejected = _get(row, "chosen", where), _get(row, "rejected", where)
        chosen_score = _number(row, ("chosen_score", "score_chosen"), 1.0, where)
        rejected_score = _number(row, ("rejected_score", "score_rejected"), 0.0, where)
        rationales = (str(row.get("chosen_rationale") or ""), str(row.get("rejected_rationale") or ""))
        if fmt == "trl" and isinstance(row["prompt"], list):  # a conversation: kept as it is
            prompt = _messages(row["prompt"], f"{where}: prompt", len(files))
    chosen_msgs, rejected_msgs = (
        _conversation("assistant", m) if isinstance(m, str) else _messages(m, f"{where}: {name}")
        for name, m in (("chosen", chosen), ("rejected", rejected))
    )
    if chosen_msgs == rejected_msgs:
        return "rows whose chosen and rejected answers are the same"
    prompt_id = content_id(question, files)
    body = json.dumps([prompt_id, chosen_msgs, rejected_msgs], sort_keys=True)
    return Pair(
        pair_id=f"{prompt_id}:{hashlib.sha256(body.encode()).hexdigest()[:16]}", prompt_id=prompt_id, prompt=prompt,
        chosen=chosen_msgs, rejected=rejected_msgs, images=files, margin=chosen_score - rejected_score,
        chosen_score=chosen_score, rejected_score=rejected_score, chosen_rationale=rationales[0],
        rejected_rationale=rationales[1],
    )  # fmt: skip


def read_pairs(
    source: str | Path, image_dir: str | Path, format: str = "auto", allow_outside_paths: bool = False
) -> tuple[list[Pair], dict[str, Any]]:
    """Preference pairs from an RLAIF-V, VLFeedback or TRL preference file (see the module
    docstring), with the summary the pairs stage reports; embedded images go to `image_dir`.

    Every pair is checked as training will read it (`preference_row`), so a bad row fails here,
    named by file and row, not in the middle of training. Repeated pairs are kept once.
    """
    from alignkit.data.preference import preference_row
    from alignkit.pairs import pairs_summary

    source, image_dir = Path(source), Path(image_dir)
    base, rows = iter_rows(source, "pairs")
    fmt, rows = detect(source, rows, format)
    if fmt not in PAIR_FORMATS:
        raise RecordError(f"{source}: {fmt} records hold no preference pairs (pairs come from "
                          f"{', '.join(PAIR_FORMATS)} files); use it as data.prompts instead")  # fmt: skip
    pairs: list[Pair] = []
    seen: set[str] = set()
    skipped: Counter[str] = Counter()
    for where, row in rows:
        if fmt == "trl" and ("chosen" not in row or "rejected" not in row):
            raise RecordError(f"{where}: a prompt-only row (no 'chosen'/'rejected') in a file of preference pairs")
        pair = pair_from(fmt, row, base, image_dir, where, allow_outside_paths)
        if isinstance(pair, str):
            skipped[pair] += 1
        elif pair.pair_id in seen:
            skipped["repeated pairs"] += 1
        else:
            preference_row(to_dict(pair), base, where, {})
            seen.add(pair.pair_id)
            pairs.append(pair)
    if not pairs:
        raise RecordError(f"{source}: no preference pairs in it" + (f" (left out: {dict(skipped)})" if skipped else ""))
    return pairs, {"format": fmt, **pairs_summary(pairs, skipped)}
