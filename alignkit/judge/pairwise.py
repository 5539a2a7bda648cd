"""Pairwise judging with position-bias control, turned into per-sample scores the pairs stage reads.

Every pair of a prompt's K samples is judged in both orders (a as A and b as B, then swapped):
K(K-1) requests per prompt. A pair has a winner only when both orders name the same sample;
otherwise it is a tie. A sample's Verdict.score is its win rate over its decided pairs (ties
count half), so `pairs` builds chosen/rejected from it as from any other score. Each comparison
is also written out (comparisons.jsonl) with both orders' raw outcomes.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, Callable

from alignkit.judge.openai_judge import Judgment, OpenAIJudge
from alignkit.judge.rubric import RATIONALE, WINNER
from alignkit.records import Prompt, Sample, Verdict, to_dict

TIE = "tie"
WIN_RATE = "win_rate"


def order_outcome(judgment: Judgment, first: Sample, second: Sample) -> dict[str, Any]:
    """One order's result: the winning sample id (or "tie"), the position it chose, or the error."""
    if judgment.verdict is None:
        return {"winner": None, "position": None, "rationale": "", "error": judgment.error}
    position = judgment.verdict[WINNER]
    winner = {"A": first.sample_id, "B": second.sample_id}.get(position, TIE)
    return {"winner": winner, "position": position, "rationale": judgment.verdict[RATIONALE], "error": None}


def decide(ab: str | None, ba: str | None) -> str | None:
    """The pair's winner from both orders: a sample only when they agree, else a tie; None if one failed."""
    if ab is None or ba is None:
        return None
    return ab if ab == ba else TIE


def comparison(prompt: Prompt, a: Sample, b: Sample, ab: Judgment, ba: Judgment) -> dict[str, Any]:
    """The record of one pair judged in both orders."""
    orders = [{"order": "ab", **order_outcome(ab, a, b)}, {"order": "ba", **order_outcome(ba, b, a)}]
    winner = decide(orders[0]["winner"], orders[1]["winner"])
    return {
        "comparison_id": f"{a.sample_id}|{b.sample_id}",
        "prompt_id": prompt.prompt_id,
        "sample_a": a.sample_id,
        "sample_b": b.sample_id,
        "winner": winner,
        "consistent": None if winner is None else orders[0]["winner"] == orders[1]["winner"],
        "orders": orders,
    }


def sample_verdicts(judge_name: str, prompt: Prompt, samples: list[Sample], comparisons: list[dict[str, Any]]) -> list[Verdict]:
    """Each sample's win rate over its decided comparisons; failed when it has none."""
    out = []
    for s in samples:
        mine = [c for c in comparisons if s.sample_id in (c["sample_a"], c["sample_b"])]
        decided = [c for c in mine if c["winner"] is not None]
        if not decided:
            if not mine:
                error = f"no_pair: prompt {prompt.prompt_id} has one sample; a pairwise judge needs two or more"
            else:
                first = next(o["error"] for c in mine for o in c["orders"] if o["error"])
                error = f"{first} (all {len(mine)} comparisons of {s.sample_id} failed)"
            out.append(Verdict(s.sample_id, prompt.prompt_id, judge_name, "failed", None, error=error))
            continue
        wins = sum(c["winner"] == s.sample_id for c in decided)
        ties = sum(c["winner"] == TIE for c in decided)
        rate = (wins + 0.5 * ties) / len(decided)
        note = (
            f"Won {wins}, tied {ties}, lost {len(decided) - wins - ties} of {len(decided)} pairwise comparisons "
            "(each judged in both orders; orders that disagree count as a tie)."
        )
        if len(decided) < len(mine):
            note += f" {len(mine) - len(decided)} comparison(s) failed and are left out."
        out.append(Verdict(s.sample_id, prompt.prompt_id, judge_name, "ok", rate, {WIN_RATE: rate}, note))
    return out


async def judge_pairwise(
    judge: OpenAIJudge,
    groups: list[tuple[Prompt, list[Sample]]],
    on_prompt: Callable[[list[dict[str, Any]], list[dict[str, Any]]], None],
) -> None:
    """Judge each prompt's samples pairwise in both orders; hand (comparisons, verdict records) per prompt."""

    async def pair(prompt: Prompt, a: Sample, b: Sample) -> dict[str, Any]:
        ab, ba = await asyncio.gather(
            judge.ask(prompt, answer_a=a.answer, response_a=a.text, answer_b=b.answer, response_b=b.text),
            judge.ask(prompt, answer_a=b.answer, response_a=b.text, answer_b=a.answer, response_b=a.text),
        )
        return comparison(prompt, a, b, ab, ba)

    async def one(prompt: Prompt, samples: list[Sample]) -> None:
        comps = await asyncio.gather(*(pair(prompt, a, b) for a, b in itertools.combinations(samples, 2)))
        on_prompt(list(comps), [to_dict(v) for v in sample_verdicts(judge.judge_name, prompt, samples, list(comps))])

    await asyncio.gather(*(one(p, ss) for p, ss in groups))


def num_judgments(groups: list[tuple[Prompt, list[Sample]]]) -> int:
    """Requests a pairwise run asks for (before the cache): both orders of every pair."""
    return sum(len(ss) * (len(ss) - 1) for _, ss in groups)
