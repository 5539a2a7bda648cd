"""Scoring with the critique reward model, and its pairwise evaluation (ACC, ACC+).

Inference as in MM-RLHF: generate a critique of the answer, append it, and read the score in one
forward pass; with several critiques (sampled) the score is their mean. `num_critiques=0` scores
the answer alone. ACC is the share of pairs ranked right; ACC+ (MM-RLHF-RewardBench) the share of
prompts whose pairs are all ranked right.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image

from alignkit.records import RecordError
from alignkit.reward.data import Messages, RMPair, collate, encode, encode_answer, render
from alignkit.reward.model import RewardModel


@dataclass
class Answer:
    """One answer to score: the prompt conversation, the answer turn and its images."""

    prompt: Messages
    answer: Messages
    images: list[Image.Image]


@dataclass
class Scored:
    score: float
    critiques: list[str] = field(default_factory=list)


def _batches(items: Sequence[Any], size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _forward_scores(rm: RewardModel, features: list[dict]) -> list[float]:
    pad_id = rm.processor.tokenizer.pad_token_id
    return rm(**collate(features, pad_id)).rewards.tolist()


def _critiques(rm: RewardModel, batch: Sequence[Answer], max_new_tokens: int, temperature: float | None) -> list[str]:
    """One critique per answer: greedy when `temperature` is None, else sampled."""
    tok = rm.processor.tokenizer
    prefixes = [encode(rm.processor, render(rm.processor, a.prompt, a.answer, True), a.images) for a in batch]
    inputs = collate(prefixes, tok.pad_token_id)
    inputs.pop("labels")
    sampling = {"do_sample": False} if temperature is None else {"do_sample": True, "temperature": temperature, "top_p": 1.0}
    out = rm.lm.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **sampling)
    return [t.strip() for t in tok.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]


@torch.inference_mode()
def score_answers(
    rm: RewardModel,
    answers: Sequence[Answer],
    *,
    num_critiques: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
) -> list[Scored]:
    """Score answers; one critique is greedy, several are sampled at `temperature` and averaged."""
    was_training = rm.training
    rm.eval()
    torch.manual_seed(seed)
    results: list[Scored] = []
    for batch in _batches(answers, batch_size):
        if num_critiques == 0:
            feats = [encode_answer(rm.processor, a.prompt, a.answer, a.images, None) for a in batch]
            results += [Scored(s) for s in _forward_scores(rm, feats)]
            continue
        scored = [Scored(0.0) for _ in batch]
        for _ in range(num_critiques):
            crits = _critiques(rm, batch, max_new_tokens, None if num_critiques == 1 else temperature)
            feats = [encode_answer(rm.processor, a.prompt, a.answer, a.images, c) for a, c in zip(batch, crits)]
            for s, c, value in zip(scored, crits, _forward_scores(rm, feats)):
                s.score += value / num_critiques
                s.critiques.append(c)
        results += scored
    rm.train(was_training)
    return results


def pair_answers(pairs: Sequence[RMPair]) -> list[Answer]:
    """Each pair's chosen then rejected answer, in order: [c0, r0, c1, r1, ...]."""
    from alignkit.records import load_image

    out = []
    for p in pairs:
        images = [load_image(path) for path in p.images]
        out += [Answer(p.prompt, p.chosen, images), Answer(p.prompt, p.rejected, images)]
    return out


def pairwise_accuracy(prompt_ids: Sequence[str], r_chosen: Sequence[float], r_rejected: Sequence[float]) -> dict[str, float]:
    """ACC (pairs with r_chosen > r_rejected; a tie is wrong) and ACC+ (prompts with every pair right)."""
    if not prompt_ids:
        return {"acc": float("nan"), "acc_plus": float("nan"), "num_pairs": 0, "num_prompts": 0}
    right = [c > r for c, r in zip(r_chosen, r_rejected)]
    by_prompt: dict[str, bool] = defaultdict(lambda: True)
    for pid, ok in zip(prompt_ids, right):
        by_prompt[pid] &= ok
    return {
        "acc": sum(right) / len(right),
        "acc_plus": sum(by_prompt.values()) / len(by_prompt),
        "num_pairs": len(right),
        "num_prompts": len(by_prompt),
    }


def evaluate_pairs(rm: RewardModel, pairs: Sequence[RMPair], **score_options) -> dict[str, float]:
    """ACC and ACC+ of the reward model on pairs (tied pairs left out), scoring as `score_answers`."""
    pairs = [p for p in pairs if p.margin != 0]
    scores = [s.score for s in score_answers(rm, pair_answers(pairs), **score_options)]
    return pairwise_accuracy([p.prompt_id for p in pairs], scores[0::2], scores[1::2])


def add_rm_columns(pairs: list[dict[str, Any]], scores: dict[str, float], where: str) -> list[dict[str, Any]]:
    """Pairs with `rm_chosen_score`, `rm_rejected_score` and `rm_margin` (chosen minus rejected) added."""
    out = []
    for p in pairs:
        missing = [sid for sid in (p.get("chosen_id"), p.get("rejected_id")) if sid not in scores]
        if missing:
            raise RecordError(f"{where}: pair {p.get('pair_id')!r}: no reward-model score for sample(s) {missing}")
        c, r = scores[p["chosen_id"]], scores[p["rejected_id"]]
        out.append({**p, "rm_chosen_score": c, "rm_rejected_score": r, "rm_margin": c - r})
    return out
