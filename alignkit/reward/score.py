"""Scoring with the critique reward model, and its pairwise evaluation (ACC, ACC+).

Inference as in MM-RLHF: generate a critique of the answer, append it, and read the score in one
forward pass; with several critiques (sampled) the score is their mean. `num_critiques=0` scores
the answer alone. ACC is the share of pairs ranked right; ACC+ (MM-RLHF-RewardBench) the share of
prompts whose pairs are all ranked right.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from alignkit.models.inputs import collate, encode
from alignkit.pairs import _conversation
from alignkit.records import Prompt, RecordError, Sample, iter_jsonl, load_image, write_jsonl
from alignkit.reward.data import Messages, RMPair, encode_answer, render
from alignkit.reward.model import RewardModel, load_reward_model


@dataclass
class Answer:
    """One answer to score: the prompt conversation, the answer turn and its images."""

    prompt: Messages
    answer: Messages
    images: list[Image.Image]


@dataclass
class Scored:
    """A score (the mean over critiques) and the critiques it was read after."""

    score: float
    critiques: list[str] = field(default_factory=list)


def _batches(items: Sequence[Any], size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _forward_scores(rm: RewardModel, features: list[dict]) -> list[float]:
    pad_id = rm.processor.tokenizer.pad_token_id
    return rm(**collate(features, pad_id, side="left")).rewards.tolist()


def _critiques(rm: RewardModel, batch: Sequence[Answer], max_new_tokens: int, temperature: float | None) -> list[str]:
    """One critique per answer: greedy when `temperature` is None, else sampled."""
    tok = rm.processor.tokenizer
    prefixes = [encode(rm.processor, render(rm.processor, a.prompt, a.answer, True), a.images) for a in batch]
    inputs = collate(prefixes, tok.pad_token_id, side="left")
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


RM_COLUMNS = ("rm_chosen_score", "rm_rejected_score", "rm_margin")


def score_samples(
    rm_dir: Path,
    prompts: Sequence[Prompt],
    samples: Sequence[Sample],
    user_text: dict[str, str],
    output: Path,
    *,
    seed: int = 0,
    **score_options: Any,
) -> dict[str, Any]:
    """Score every sample's full text, as the pairs present it; writes `output` (jsonl) and returns a summary."""
    rm = load_reward_model(rm_dir)
    by_id = {p.prompt_id: p for p in prompts}
    images = {p.prompt_id: [load_image(path) for path in p.images] for p in prompts}
    answers = []
    for s in samples:
        if s.prompt_id not in by_id:
            raise RecordError(f"sample {s.sample_id!r} refers to unknown prompt_id {s.prompt_id!r}")
        p = by_id[s.prompt_id]
        prompt = _conversation("user", user_text[p.prompt_id], len(p.images))
        answers.append(Answer(prompt, _conversation("assistant", s.text), images[p.prompt_id]))
    scored = score_answers(rm, answers, seed=seed, **score_options)
    write_jsonl(output, [
        {"sample_id": s.sample_id, "prompt_id": s.prompt_id, "rm_score": r.score, "rm_critiques": r.critiques}
        for s, r in zip(samples, scored)
    ])  # fmt: skip
    values = [r.score for r in scored]
    return {"num_scored": len(values), "mean_rm_score": sum(values) / len(values) if values else None}


def annotate_pairs_file(pairs_path: Path, scores_path: Path) -> dict[str, float]:
    """Add the rm_* columns to a pairs file (rewritten only if they change); returns ACC/ACC+ vs the judge."""
    pairs = [obj for _, obj in iter_jsonl(pairs_path)]
    scores = {obj["sample_id"]: obj["rm_score"] for _, obj in iter_jsonl(scores_path)}
    annotated = add_rm_columns(pairs, scores, str(pairs_path))
    if annotated != pairs:
        write_jsonl(pairs_path, annotated)
    ranked = [p for p in annotated if p.get("margin", 1.0) != 0]
    return pairwise_accuracy(
        [p["prompt_id"] for p in ranked], [p["rm_chosen_score"] for p in ranked], [p["rm_rejected_score"] for p in ranked]
    )


def rm_pairs_digest(pairs_path: Path) -> str:
    """Hash of a pairs file's content without the rm_* columns (what reward-model training reads)."""
    h = hashlib.sha256()
    for _, obj in iter_jsonl(pairs_path):
        h.update(json.dumps({k: v for k, v in obj.items() if k not in RM_COLUMNS}, sort_keys=True).encode())
    return h.hexdigest()
