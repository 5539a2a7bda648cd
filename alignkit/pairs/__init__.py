"""Preference pairs from judged samples, in the format TRL's `DPOTrainer` reads.

Each pair is a conversational preference example (`prompt`, `chosen`, `rejected`, `images`) plus
what makes it useful outside alignkit: ids of both samples, both scores, the margin and both
judge rationales. Failed verdicts never make a pair (a failure is not a low score).
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from typing import Any

from alignkit.errors import RecordError
from alignkit.pairs.config import PairsConfig
from alignkit.records import Pair, Prompt, Sample, Verdict

STRATEGIES = ("best_worst", "threshold")


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
    )


def select_pairs(scored: list[tuple[Sample, Verdict]], strategy: str, min_margin: float) -> list[tuple[int, int]]:
    """Indices (chosen, rejected) into `scored` for one prompt.

    `best_worst`: the highest- against the lowest-scored answer (first in sample order on ties),
    as in RLAIF-V. `threshold`: every ordered pair whose margin reaches `min_margin`, as in
    MM-RLHF, which uses all pairs of differently-scored answers. A pair needs a positive margin.
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
    return pairs, pairs_summary(pairs, skipped)


def pairs_summary(pairs: list[Pair], skipped: Counter[str]) -> dict[str, Any]:
    """What the pairs stage reports: how many pairs, over how many prompts, the mean margin, and
    what was left out and why."""
    margins = [p.margin for p in pairs]
    return {
        "num_pairs": len(pairs),
        "prompts_with_pairs": len({p.prompt_id for p in pairs}),
        "mean_margin": sum(margins) / len(margins) if margins else 0.0,
        "skipped": dict(skipped),
    }
