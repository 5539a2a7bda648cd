"""Scoring with the critique reward model, and its pairwise evaluation (ACC, ACC+).

Inference as in MM-RLHF: generate a critique of the answer, append it, and read the score in one
forward pass; with several critiques (sampled) the score is their mean. `num_critiques=0` scores
the answer alone. ACC is the share of pairs ranked right; ACC+ (MM-RLHF-RewardBench) the share of
prompts whose pairs are all ranked right.

Many processes (a launch, see `alignkit.launch`): `score_shared` splits the answers between them
by whole batches and gathers the scores back in order. An answer is scored in the batch it has in
one process, and its sampled critiques are seeded by (seed, its index) alone, so the scores do not
depend on the number of processes. The model sits where accelerate says (`process_state().device`).
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

from alignkit.console import progress
from alignkit.models.device import ComputeSettings, process_state
from alignkit.models.inputs import collate, encode
from alignkit.models.lengths import (
    CONTEXT,
    Length,
    Overlong,
    context_length,
    example_length,
    over_limit,
    skipped_summary,
)
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


def _collate(rm: RewardModel, features: list[dict]) -> dict[str, torch.Tensor]:
    """A left-padded batch on the reward model's device."""
    device = rm.head.weight.device
    return {k: v.to(device) for k, v in collate(features, rm.processor.tokenizer.pad_token_id, side="left").items()}


def _forward_scores(rm: RewardModel, features: list[dict]) -> list[float]:
    return rm(**_collate(rm, features)).rewards.tolist()


def _critiques(rm: RewardModel, batch: Sequence[Answer], max_new_tokens: int, num: int = 1,
               temperature: float | None = None) -> list[list[str]]:  # fmt: skip
    """`num` critiques per answer: greedy when `temperature` is None, else sampled."""
    tok = rm.processor.tokenizer
    prefixes = [encode(rm.processor, render(rm.processor, a.prompt, a.answer, True), a.images) for a in batch]
    inputs = _collate(rm, prefixes)
    inputs.pop("labels")
    sampling = {"do_sample": False} if temperature is None else {"do_sample": True, "temperature": temperature, "top_p": 1.0}
    out = rm.lm.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                         num_return_sequences=num, **sampling)  # fmt: skip
    texts = [t.strip() for t in tok.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]
    return [texts[i * num : (i + 1) * num] for i in range(len(batch))]  # an input's sequences are consecutive


def answer_seed(seed: int, index: int) -> int:
    """The seed of answer `index`'s sampled critiques: a function of (seed, index) only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little")


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
    indices: Sequence[int] | None = None,
) -> list[Scored]:
    """Score answers in batches of `batch_size`; one critique is greedy, several are sampled at
    `temperature` and averaged.

    Answer i's sampled critiques are drawn one answer at a time after seeding with
    `answer_seed(seed, indices[i])` (default index: i), so they do not depend on the other answers
    of its batch, nor on which process scores it.
    """
    was_training = rm.training
    rm.eval()
    indices = range(len(answers)) if indices is None else indices
    results: list[Scored] = []
    batches = zip(_batches(answers, batch_size), _batches(indices, batch_size))
    for batch, keys in progress(batches, desc="score", total=-(-len(answers) // batch_size), leave=False):
        if num_critiques == 0:
            feats = [encode_answer(rm.processor, a.prompt, a.answer, a.images, None) for a in batch]
            results += [Scored(s) for s in _forward_scores(rm, feats)]
            continue
        if num_critiques == 1:
            crits = _critiques(rm, batch, max_new_tokens)
        else:
            crits = []
            for a, key in zip(batch, keys):
                torch.manual_seed(answer_seed(seed, key))
                crits += _critiques(rm, [a], max_new_tokens, num_critiques, temperature)
        scored = [Scored(0.0) for _ in batch]
        for k in range(num_critiques):
            feats = [encode_answer(rm.processor, a.prompt, a.answer, a.images, c[k]) for a, c in zip(batch, crits)]
            for s, c, value in zip(scored, crits, _forward_scores(rm, feats)):
                s.score += value / num_critiques
                s.critiques.append(c[k])
        results += scored
    rm.train(was_training)
    return results


def score_shared(rm: RewardModel, answers: Sequence[Answer], *, batch_size: int = 8, **options: Any) -> list[Scored]:
    """`score_answers` split between the processes of a launch; every process gets all the scores, in order.

    Call it in every process. The unit of the split is a batch of `batch_size` answers (contiguous
    runs of batches per process, accelerate's `split_between_processes`), so each answer is scored
    in the same batch as in one process; `gather_object` concatenates the parts in process order.
    """
    from accelerate.utils import gather_object

    batches = list(_batches(range(len(answers)), batch_size))
    with process_state().split_between_processes(batches) as mine:
        local = [i for b in mine for i in b]
    scored = score_answers(rm, [answers[i] for i in local], batch_size=batch_size, indices=local, **options)
    return gather_object(scored)


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
    """ACC and ACC+ of the reward model on pairs (tied pairs left out), scoring as `score_answers`;
    call it in every process of a launch (`score_shared`)."""
    pairs = [p for p in pairs if p.margin != 0]
    scores = [s.score for s in score_shared(rm, pair_answers(pairs), **score_options)]
    return pairwise_accuracy([p.prompt_id for p in pairs], scores[0::2], scores[1::2])


def add_rm_columns(pairs: list[dict[str, Any]], scores: dict[str, float], where: str) -> list[dict[str, Any]]:
    """Pairs with `rm_chosen_score`, `rm_rejected_score` and `rm_margin` (chosen minus rejected) added;
    a score of None (an answer skipped as overlong) makes the margin None."""
    out = []
    for p in pairs:
        missing = [sid for sid in (p.get("chosen_id"), p.get("rejected_id")) if sid not in scores]
        if missing:
            raise RecordError(f"{where}: pair {p.get('pair_id')!r}: no reward-model score for sample(s) {missing}")
        c, r = scores[p["chosen_id"]], scores[p["rejected_id"]]
        margin = None if c is None or r is None else c - r
        out.append({**p, "rm_chosen_score": c, "rm_rejected_score": r, "rm_margin": margin})
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
    compute: ComputeSettings = ComputeSettings(),
    overlong: Overlong = "stop",
    **score_options: Any,
) -> dict[str, Any]:
    """Score every sample's full text, as the pairs present it; writes `output` (jsonl) and returns a summary.

    `compute` gives the dtype (bf16 where the compute is bf16) and attention kernel the model loads
    with. Call it in every process of a launch: they share the answers (`score_shared`), the main one writes.
    An answer longer than the model's context (`answer_length`) stops it, or under `overlong="skip"`
    is not scored: its line has `rm_score` null, and the pairs it is in get null rm_* columns.
    """
    from alignkit.models import place

    state = process_state()
    rm = place(load_reward_model(rm_dir, compute.dtype(), compute.attn_implementation))  # this process's device
    by_id = {p.prompt_id: p for p in prompts}
    images = {p.prompt_id: [load_image(path) for path in p.images] for p in prompts}
    answers = []
    for s in samples:
        if s.prompt_id not in by_id:
            raise RecordError(f"sample {s.sample_id!r} refers to unknown prompt_id {s.prompt_id!r}")
        p = by_id[s.prompt_id]
        prompt = _conversation("user", user_text[p.prompt_id], len(p.images))
        answers.append(Answer(prompt, _conversation("assistant", s.text), images[p.prompt_id]))
    budget = {k: score_options[k] for k in ("num_critiques", "max_new_tokens") if k in score_options}
    lengths = [answer_length(rm, a, s.sample_id, **budget) for a, s in zip(answers, samples)]
    skipped = over_limit(lengths, context_length(rm.lm.config), overlong, CONTEXT)
    kept = [i for i, s in enumerate(samples) if s.sample_id not in skipped]
    by_index = dict(zip(kept, score_shared(rm, [answers[i] for i in kept], seed=seed, **score_options)))
    if state.is_main_process:
        write_jsonl(output, [
            {"sample_id": s.sample_id, "prompt_id": s.prompt_id, "rm_score": r.score if r else None,
             "rm_critiques": r.critiques if r else []}
            for s, r in ((s, by_index.get(i)) for i, s in enumerate(samples))
        ])  # fmt: skip
    state.wait_for_everyone()
    values = [r.score for r in by_index.values()]
    return {"num_scored": len(values), "mean_rm_score": sum(values) / len(values) if values else None,
            "num_processes": state.num_processes, **skipped_summary(skipped)}  # fmt: skip


def answer_length(rm: RewardModel, answer: Answer, id_: str, num_critiques: int = 1, max_new_tokens: int = 64) -> Length:
    """An answer's length as `score_answers` reads it (image tokens counted): the chat up to the
    critique plus `max_new_tokens` and the critique's end, or without critiques the chat up to the
    answer's end."""
    text = render(rm.processor, answer.prompt, answer.answer, num_critiques > 0)
    ids = encode(rm.processor, text, answer.images)["input_ids"]
    return example_length(id_, ids, rm.lm.config, max_new_tokens + 1 if num_critiques else 0)


def annotate_pairs_file(pairs_path: Path, scores_path: Path) -> dict[str, float]:
    """Add the rm_* columns to a pairs file (rewritten only if they change); returns ACC/ACC+ vs the judge."""
    pairs = [obj for _, obj in iter_jsonl(pairs_path)]
    scores = {obj["sample_id"]: obj["rm_score"] for _, obj in iter_jsonl(scores_path)}
    annotated = add_rm_columns(pairs, scores, str(pairs_path))
    if annotated != pairs:
        write_jsonl(pairs_path, annotated)
    ranked = [p for p in annotated if p.get("margin", 1.0) != 0 and p["rm_margin"] is not None]
    return pairwise_accuracy(
        [p["prompt_id"] for p in ranked], [p["rm_chosen_score"] for p in ranked], [p["rm_rejected_score"] for p in ranked]
    )


def rm_pairs_digest(pairs_path: Path) -> str:
    """Hash of a pairs file's content without the rm_* columns (what reward-model training reads)."""
    h = hashlib.sha256()
    for _, obj in iter_jsonl(pairs_path):
        h.update(json.dumps({k: v for k, v in obj.items() if k not in RM_COLUMNS}, sort_keys=True).encode())
    return h.hexdigest()
