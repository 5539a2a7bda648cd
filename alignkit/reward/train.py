"""Training the critique reward model on preference pairs (critique CE + Bradley-Terry, see losses.py).

Reads top to bottom: set-up (pairs, held-out split, model), loop, save, held-out evaluation.

Devices and processes come from accelerate (`alignkit.models.device`), as in `alignkit.train.sft`:
the same loop runs as one process or as N (`alignkit.launch`). `batch_size` is per process; a step
takes a global batch of batch_size × grad_accum × num_processes pairs from one shuffled order, and
process r trains on its own slices of it. Every mean of the loss (critique tokens, untied, tied and
all pairs) is a sum over this process's slice divided by the global batch's count (scaled by
num_processes, which DDP's gradient mean divides back out), so every split of the same global batch
takes the same step: 2 processes × batch 2 equal 1 process × batch 4. The run key holds the global
batch, not the split: a run resumes with another process count when the global batch is unchanged.
Only the main process writes metrics, checkpoints and the model; the held-out evaluation is shared
between the processes (`alignkit.reward.score.score_shared`). The output directory:

    out_dir/metrics.jsonl  one line per step: loss, bradley_terry, tie, center, critique_ce, accuracy
    out_dir/encoded/       the pairs' encodings (`alignkit.models.encoded`), kept for a resume; removed with the checkpoints
    out_dir/checkpoints/   every `reward_model.save_steps` steps (`alignkit.models.checkpoint`); a re-run with the same
                           pairs and settings resumes from the last one; removed once the model is saved
    out_dir/model/         the reward model (see model.py), written last and atomically
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from alignkit.console import progress
from alignkit.errors import finite
from alignkit.models.checkpoint import load_checkpoint, resume_point, save_checkpoint
from alignkit.models.device import ComputeSettings, make_accelerator, process_state
from alignkit.models.encoded import encode_to_disk
from alignkit.models.inputs import IGNORE, collate
from alignkit.models.lengths import CONTEXT, context_length, example_length, over_limit, skipped_summary
from alignkit.records import load_image
from alignkit.reward.config import RewardModelConfig, score_options
from alignkit.reward.data import RMPair, pair_features, read_rm_pairs
from alignkit.reward.losses import LossCounts, LossWeights, reward_loss
from alignkit.reward.model import RewardModel, build_reward_model
from alignkit.reward.score import Answer, answer_length, evaluate_pairs, rm_pairs_digest
from alignkit.tracking import StepLog, Tracking


def split_by_prompt(pairs: Sequence[RMPair], eval_fraction: float, seed: int) -> tuple[list[RMPair], list[RMPair]]:
    """(train, held-out) with whole prompts held out, so ACC+ sees every pair of a held-out prompt."""
    prompt_ids = sorted({p.prompt_id for p in pairs})
    random.Random(seed).shuffle(prompt_ids)
    n_eval = math.ceil(eval_fraction * len(prompt_ids)) if len(prompt_ids) > 1 else 0
    held = set(prompt_ids[:n_eval])
    return [p for p in pairs if p.prompt_id not in held], [p for p in pairs if p.prompt_id in held]


PARTS = ("loss", "bradley_terry", "tie", "center", "critique_ce")
"""The loss parts `fit` logs per step (with `step` and `accuracy`)."""


def fit(
    rm: RewardModel,
    pairs: Sequence[RMPair],
    *,
    steps: int,
    batch_size: int = 4,
    grad_accum: int = 1,
    learning_rate: float = 1e-4,
    weights: LossWeights = LossWeights(),
    use_critiques: bool = True,
    seed: int = 0,
    log: StepLog | None = None,
    encoded_dir: Path,
    checkpoint_dir: Path | None = None,
    save_steps: int = 50,
    resume_from: str | Path | None = None,
    compute: ComputeSettings = ComputeSettings(),
) -> list[dict[str, float]]:
    """Train `rm` in place for `steps` AdamW steps; returns the metrics of the steps it ran (in every process).

    A step takes a global batch of batch_size × grad_accum × num_processes pairs (see the module
    docstring). The pairs are encoded into `encoded_dir` (`alignkit.models.encoded`; shared by the
    processes) and read from there. The main process writes each step to `log` (metrics.jsonl and the
    trackers). With `checkpoint_dir` the main process saves the loop state every `save_steps`;
    `resume_from` (a checkpoint of the same pairs and settings) continues from there. `compute` holds
    the `train` section's precision and memory keys.
    """
    accelerator = make_accelerator(compute, loop="reward model")
    compute.for_training(rm.lm)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    global_batch = batch_size * grad_accum * world
    torch.manual_seed(seed)
    # encode to disk (each process a share; each reads every pair's counts: the loss is normalised by the
    # global batch's)
    features = encode_to_disk(
        encoded_dir, pairs, lambda p: pair_features(rm.processor, p, use_critiques),
        [[asdict(p) for p in pairs], use_critiques, type(rm.processor).__name__],
        progress=lambda n: progress(total=n, desc="encode", leave=False, disable=not main),
    )  # fmt: skip
    tokens = [sum(int((f["labels"][1:] != IGNORE).sum()) for f in features.get(i, ("labels",)))
              for i in range(len(pairs))]  # critique tokens  # fmt: skip
    pad_id = rm.processor.tokenizer.pad_token_id
    params = [p for p in rm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    wrapped, optimizer = accelerator.prepare(rm, optimizer)  # the reward head is part of `rm`: it trains too
    margins = torch.tensor([p.margin for p in pairs], device=accelerator.device)
    shuffler = torch.Generator().manual_seed(seed)
    order: list[int] = []
    history = []
    step = 0
    if resume_from is not None:
        step, extra = load_checkpoint(resume_from, modules={"rm": rm}, optimizer=optimizer)
        order = extra["order"]
        shuffler.set_state(extra["shuffler"])
    wrapped.train()
    bar = progress(total=steps, initial=step, desc="reward model", disable=not main)
    while step < steps:
        while len(order) < global_batch:  # epochs of shuffled pairs
            order += torch.randperm(len(pairs), generator=shuffler).tolist()
        idx, order = order[:global_batch], order[global_batch:]
        counts = LossCounts.of([pairs[i].margin for i in idx], sum(tokens[i] for i in idx))
        sums = torch.zeros(len(PARTS) + 1, dtype=torch.float64, device=accelerator.device)  # parts, right pairs
        for m in range(grad_accum):
            # micro-batch m of process r: slice m * world + r of the global batch
            part = idx[(m * world + rank) * batch_size :][:batch_size]
            # chosen answers first, then rejected, in one forward pass
            batch = collate([features[i][0] for i in part] + [features[i][1] for i in part], pad_id, side="left")
            sync = m == grad_accum - 1  # all-reduce the gradients once, after the last micro-batch
            with contextlib.nullcontext() if sync else accelerator.no_sync(wrapped):
                out = wrapped(**{k: v.to(accelerator.device) for k, v in batch.items()})
                r_chosen, r_rejected = out.rewards[: len(part)], out.rewards[len(part) :]
                loss, parts = reward_loss(r_chosen, r_rejected, margins[part], out.critique_logits,
                                          out.critique_targets, weights, counts)  # fmt: skip
                accelerator.backward(loss * world)  # DDP averages over processes; we want their sum
            right = (r_chosen > r_rejected).sum().item()
            sums += torch.tensor([parts[k] for k in PARTS] + [right], dtype=torch.float64, device=accelerator.device)
        # the global batch's loss parts, the same in every process (so all stop together if it is NaN)
        *values, right = accelerator.reduce(sums, "sum").tolist()
        record = dict(zip(PARTS, values))
        finite(record["loss"], f"reward model step {step + 1}: the loss")
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update()
        record.update(step=step, accuracy=right / counts.pairs)
        history.append(record)
        if log is not None:
            log.write(record)
        if checkpoint_dir is not None and step % save_steps == 0 and step < steps:
            if main:
                save_checkpoint(checkpoint_dir, step, modules={"rm": rm}, optimizer=optimizer,
                                extra={"order": order, "shuffler": shuffler.get_state()}, keep=1)  # fmt: skip
            accelerator.wait_for_everyone()
    bar.close()
    return history


def fitting_pairs(rm: RewardModel, pairs: list[RMPair], cfg: RewardModelConfig) -> tuple[list[RMPair], set[str]]:
    """The pairs whose answers fit the model's context (image tokens counted) both as they train
    (with their critiques when `cfg.use_critiques`) and as the held-out evaluation scores them
    (`alignkit.reward.score.answer_length`), and the ids of those left out under
    `reward_model.overlong: skip`; under `stop` a `StageInputError` names them."""
    config, budget = rm.lm.config, {"num_critiques": cfg.num_critiques, "max_new_tokens": cfg.max_critique_tokens}
    lengths = []
    for pair in pairs:
        trained = [example_length(pair.pair_id, f["input_ids"], config)
                   for f in pair_features(rm.processor, pair, cfg.use_critiques)]  # fmt: skip
        images = [load_image(p) for p in pair.images]
        scored = [answer_length(rm, Answer(pair.prompt, a, images), pair.pair_id, **budget)
                  for a in (pair.chosen, pair.rejected)]  # fmt: skip
        lengths.append(max(trained + scored, key=lambda x: x.tokens))
    skipped = over_limit(lengths, context_length(config), cfg.overlong, CONTEXT)
    return [p for p in pairs if p.pair_id not in skipped], skipped


def train_reward_model(
    pairs_path: Path,
    out_dir: Path,
    cfg: RewardModelConfig = RewardModelConfig(),
    *,
    model: str,
    seed: int = 0,
    compute: ComputeSettings = ComputeSettings(),
    tracking: Tracking | None = None,
) -> dict[str, Any]:
    """Train a reward model on a pairs file into `out_dir/model`; returns a summary with held-out ACC/ACC+.

    The settings are the `reward_model` section's, and `compute` the `train` section's precision and
    memory keys; `tracking` the tracker run the steps also go to. Pair rationales are the critiques
    (`cfg.use_critiques`); pairs without one train the score only. Pairs longer than the model's
    context stop the run or are left out (`cfg.overlong`, see `fitting_pairs`). The held-out
    evaluation scores as `score_options(cfg)` says. Run it in every process of a launch; it returns
    when all are done.
    """
    from accelerate.utils import broadcast_object_list

    weights = LossWeights(cfg.critique_weight, cfg.margin_weight, cfg.tie_weight, cfg.center_weight)
    out_dir = Path(out_dir)
    metrics, checkpoints = out_dir / "metrics.jsonl", out_dir / "checkpoints"
    state = process_state()
    global_batch = cfg.batch_size * cfg.grad_accum * state.num_processes

    # set-up (the same pairs, split and initialisation in every process)
    torch.manual_seed(seed)
    # float32 weights; accelerate places the model and runs the compute in its mixed precision
    rm = build_reward_model(model, cfg.finetune, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                            lora_dropout=cfg.lora_dropout, target_modules=cfg.target_modules, dtype=torch.float32,
                            attn_implementation=compute.attn_implementation)  # fmt: skip
    pairs, skipped = fitting_pairs(rm, read_rm_pairs(pairs_path), cfg)
    train_pairs, held_out = split_by_prompt(pairs, cfg.eval_fraction, seed)

    # resume: the last complete checkpoint of a run with these pairs and settings (more steps extend a
    # run; the global batch counts, not its split). The main process decides.
    settings = {"pairs": rm_pairs_digest(pairs_path), "model": model, "seed": seed, "global_batch": global_batch,
                "compute": [compute.precision(), compute.attn_implementation],
                "config": cfg.model_dump(mode="json", exclude={"max_steps", "save_steps", "checkpoint", "batch_size",
                                                               "grad_accum"})}  # fmt: skip
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    box = [resume_point(out_dir, settings, checkpoints, metrics) if state.is_main_process else None]
    broadcast_object_list(box)

    # train
    log = StepLog(metrics, tracking) if state.is_main_process else None
    history = fit(rm, train_pairs, steps=cfg.max_steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                  learning_rate=cfg.learning_rate, weights=weights, use_critiques=cfg.use_critiques, seed=seed,
                  log=log, encoded_dir=out_dir / "encoded", checkpoint_dir=checkpoints, save_steps=cfg.save_steps, resume_from=box[0],
                  compute=compute)  # fmt: skip
    if log:
        log.close()

    # save, then evaluate on held-out prompts
    if state.is_main_process:
        rm.save(out_dir / "model")
        shutil.rmtree(checkpoints, ignore_errors=True)
        shutil.rmtree(out_dir / "encoded", ignore_errors=True)
    state.wait_for_everyone()
    summary: dict[str, Any] = {"model": str(out_dir / "model"), "train_pairs": len(train_pairs),
                               "final": history[-1] if history else {}, "num_processes": state.num_processes,
                               "global_batch_size": global_batch, **skipped_summary(skipped)}  # fmt: skip
    if held_out:
        summary["held_out"] = evaluate_pairs(rm, held_out, seed=seed, **score_options(cfg))
    return summary
