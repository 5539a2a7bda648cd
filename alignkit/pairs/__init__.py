"""Preference pairs from judged samples, in the format TRL's `DPOTrainer` reads.

Each pair is a conversational preference example (`prompt`, `chosen`, `rejected`, `images`) plus
what makes it useful outside alignkit: ids of both samples, both scores, the margin and both
judge rationales. Failed verdicts never make a pair (a failure is not a low score). Every
strategy's summary reports the length bias of chosen against rejected answers, in words.
"""

from __future__ import annotations

import itertools
import random
import statistics
from collections import Counter, defaultdict
from typing import Any

from alignkit.errors import RecordError
from alignkit.pairs.config import PairsConfig
from alignkit.records import Pair, Prompt, Sample, Verdict

STRATEGIES = ("best_worst", "threshold", "rlaifv")


def _conversation(role: str, text: str, num_images: int = 0) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": text})
    return [{"role": role, "content": content}]


def make_pair(prompt: Prompt, user_text: str, chosen: tuple[Sample, Verdict], rejected: tuple[Sample, Verdict]) -> Pair:
    """One pair; `user_text` is the prompt exactly as the policy saw it (template applied)."""
    (cs, cv), (rs, rv) = chosen, rejected
    assert cv.score is not None and rv.score is not None
    return Pair(
        pair_id=f"{cs.sample_id}>{rs.sample_id}",
        prompt_id=prompt.prompt_id,
        prompt=_conversation("user", user_text, len(prompt.images)),
        chosen=_conversation("assistant", cs.text),
        rejected=_conversation("assistant", rs.text),
        images=list(prompt.images),
        margin=cv.score - rv.score,
        chosen_score=cv.score,
        rejected_score=rv.score,
        chosen_rationale=cv.rationale,
        rejected_rationale=rv.rationale,
        chosen_id=cs.sample_id,
        rejected_id=rs.sample_id,
        level=prompt.level,
    )


def select_pairs(scored: list[tuple[Sample, Verdict]], strategy: str, min_margin: float) -> list[tuple[int, int]]:
    """Indices (chosen, rejected) into `scored` for one prompt.

    `best_worst`: the highest- against the lowest-scored answer (first in sample order on ties).
    `threshold` (and `rlaifv`, before `rlaifv_filter`): every ordered pair whose margin reaches
    `min_margin`, as in MM-RLHF, which uses all pairs of differently-scored answers, and RLAIF-V
    (`utils/pair_construction.py`: every two answers whose scores differ by `diff`). A pair needs a
    positive margin.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pairs strategy {strategy!r}; choose one of {STRATEGIES}")
    scores = [v.score for _, v in scored]
    floor = max(min_margin, 1e-12)
    if strategy == "best_worst":
        if len(scored) < 2:
            return []
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        return [(best, worst)] if scores[best] - scores[worst] >= floor else []
    return [(i, j) for i, j in itertools.permutations(range(len(scored)), 2) if scores[i] - scores[j] >= floor]


def build_pairs(
    prompts: list[Prompt],
    samples: list[Sample],
    verdicts: list[Verdict],
    user_text: dict[str, str],
    cfg: PairsConfig = PairsConfig(),
) -> tuple[list[Pair], dict[str, Any]]:
    """Build pairs for every prompt as `cfg` says; returns the pairs and a summary of what was left
    out and why. `user_text` maps prompt_id to the user message as the policy saw it.
    """
    by_id = {p.prompt_id: p for p in prompts}
    verdict_of = {v.sample_id: v for v in verdicts}
    grouped: dict[str, list[tuple[Sample, Verdict]]] = defaultdict(list)
    skipped: Counter[str] = Counter()
    for s in samples:
        if s.prompt_id not in by_id:
            raise RecordError(f"sample {s.sample_id!r} refers to unknown prompt_id {s.prompt_id!r} (samples from other prompts?)")
        v = verdict_of.get(s.sample_id)
        if v is None:
            skipped["samples without a verdict"] += 1
        elif v.status != "ok" or v.score is None:
            skipped["failed verdicts"] += 1
        else:
            grouped[s.prompt_id].append((s, v))
    pairs = []
    for pid, scored in grouped.items():
        chosen = select_pairs(scored, cfg.strategy, cfg.min_margin)
        if not chosen:
            skipped["prompts with no pair (tied or below min_margin)"] += 1
        pairs.extend(make_pair(by_id[pid], user_text[pid], scored[i], scored[j]) for i, j in chosen)
    summary: dict[str, Any] = {}
    if cfg.strategy == "rlaifv":
        pairs, summary["length_filter"] = rlaifv_filter(pairs, cfg, skipped)
    return pairs, pairs_summary(pairs, skipped) | summary


def pairs_summary(pairs: list[Pair], skipped: Counter[str]) -> dict[str, Any]:
    """What the pairs stage reports: how many pairs, over how many prompts, the mean margin, what
    was left out and why, and the length bias of chosen vs rejected answers."""
    margins = [p.margin for p in pairs]
    return {
        "num_pairs": len(pairs),
        "prompts_with_pairs": len({p.prompt_id for p in pairs}),
        "mean_margin": sum(margins) / len(margins) if margins else 0.0,
        "skipped": dict(skipped),
        "length_bias": length_bias(pairs),
    }


def _text(turns: list[dict[str, Any]]) -> str:
    return " ".join(c.get("text", "") for t in turns for c in t["content"] if c.get("type") == "text")


def _words(turns: list[dict[str, Any]]) -> int:
    """An answer's length in whitespace-separated words, as RLAIF-V measures it."""
    return len(_text(turns).split())


def length_bias(pairs: list[Pair]) -> dict[str, Any]:
    """How much longer chosen answers are than rejected ones (in words): a DPO policy learns length
    from a biased set as readily as content. `ratio_of_means` is mean chosen / mean rejected."""
    if not pairs:
        return {"unit": "words", "chosen_mean": None, "rejected_mean": None, "ratio_of_means": None,
                "chosen_longer_share": None, "chosen_shorter_share": None}  # fmt: skip
    lengths = [(_words(p.chosen), _words(p.rejected)) for p in pairs]
    chosen, rejected = statistics.fmean(c for c, _ in lengths), statistics.fmean(r for _, r in lengths)
    return {
        "unit": "words",
        "chosen_mean": chosen,
        "rejected_mean": rejected,
        "ratio_of_means": chosen / rejected if rejected else None,
        "chosen_longer_share": sum(c > r for c, r in lengths) / len(lengths),
        "chosen_shorter_share": sum(c < r for c, r in lengths) / len(lengths),
    }


def _ratio_ok(pair: Pair, low: float | None, high: float | None) -> bool:
    """chosen/rejected words within [low, high]; a rejected answer of no words is an infinite ratio."""
    c, r = _words(pair.chosen), _words(pair.rejected)
    ratio = c / r if r else float("inf")
    return (low is None or ratio >= low) and (high is None or ratio <= high)


def _auto_min_ratio(pairs: list[Pair], high: float | None) -> float | None:
    """RLAIF-V's search (`utils/get_pairs_filter_shorten.py`): of the bounds 1.00, 0.98, ..., 0.02 on
    chosen/rejected words, the first that minimises |mean chosen - mean rejected| / mean rejected over
    the pairs it keeps. None when no bound keeps a pair with rejected words."""
    best, best_gap = None, float("inf")
    for k in range(50):
        low = (50 - k) / 50
        kept = [p for p in pairs if _ratio_ok(p, low, high)]
        rejected = sum(_words(p.rejected) for p in kept)
        if not rejected:
            continue
        gap = abs(sum(_words(p.chosen) for p in kept) - rejected) / rejected
        if gap < best_gap:
            best, best_gap = low, gap
    return best


def rlaifv_filter(pairs: list[Pair], cfg: PairsConfig, skipped: Counter[str]) -> tuple[list[Pair], dict[str, Any]]:
    """RLAIF-V's pair construction after the margin threshold (github.com/RLHF-V/RLAIF-V):
    `utils/get_preference_pairs.py` draws at most `--sample_num` (2) pairs per prompt at random, then
    `utils/get_pairs_filter_shorten.py` drops pairs with identical texts and pairs whose chosen answer
    is too much shorter than the rejected one (the bound searched to balance mean lengths: `auto`).
    The draw is seeded by the prompt id, so a re-run makes the same pairs. Counts what it drops."""
    by_prompt: dict[str, list[Pair]] = defaultdict(list)
    for p in pairs:
        by_prompt[p.prompt_id].append(p)
    drawn = []
    for pid, group in by_prompt.items():
        if len(group) > cfg.max_pairs_per_prompt:
            skipped["pairs over max_pairs_per_prompt"] += len(group) - cfg.max_pairs_per_prompt
            group = random.Random(pid).sample(group, cfg.max_pairs_per_prompt)
        drawn.extend(group)
    distinct = [p for p in drawn if _text(p.chosen).strip() != _text(p.rejected).strip()]
    if len(distinct) < len(drawn):
        skipped["pairs with identical texts"] += len(drawn) - len(distinct)
    high = cfg.max_length_ratio
    low = _auto_min_ratio(distinct, high) if cfg.min_length_ratio == "auto" else cfg.min_length_ratio
    kept = [p for p in distinct if _ratio_ok(p, low, high)]
    if len(kept) < len(distinct):
        skipped["pairs outside the length-ratio bounds"] += len(distinct) - len(kept)
    return kept, {"min_length_ratio": low, "max_length_ratio": high}
