"""Preference pairs imported from a dataset (`data.pairs`): RLAIF-V, VLFeedback and TRL preference rows.

The formats are told as `alignkit.data.formats` tells them; a row becomes an alignkit pair whose
prompt id is its content's (question and image files), so it matches the prompts read from the
same file. Used by the pairs stage in place of building pairs from judged samples.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from alignkit.data.formats import PAIR_FORMATS, _get, _question, content_id, detect
from alignkit.errors import RecordError
from alignkit.pairs import pairs_summary
from alignkit.records import Pair, image_files, iter_rows, to_dict


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
