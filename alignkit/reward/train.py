"""Training the critique reward model on preference pairs (critique CE + Bradley-Terry, see losses.py).

Reads top to bottom: set-up (pairs, held-out split, model), loop, save, held-out evaluation. The
output directory:

    out_dir/metrics.jsonl  one line per step: loss, bradley_terry, tie, center, critique_ce, accuracy
    out_dir/checkpoints/   every `reward_model.save_steps` steps (`alignkit.models.checkpoint`); a re-run with the same
                           pairs and settings resumes from the last one; removed once the model is saved
    out_dir/model/         the reward model (see model.py), written last and atomically
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from alignkit.errors import finite
from alignkit.models.checkpoint import load_checkpoint, resume_point, save_checkpoint
from alignkit.models.inputs import collate
from alignkit.reward.config import RewardModelConfig, score_options
from alignkit.reward.data import RMPair, pair_features, read_rm_pairs
from alignkit.reward.losses import LossWeights, reward_loss
from alignkit.reward.model import RewardModel, build_reward_model
from alignkit.reward.score import evaluate_pairs, rm_pairs_digest

"""Checkpoint interval of `train_reward_model` (the loop's state is small next to a step's work)."""


def split_by_prompt(pairs: Sequence[RMPair], eval_fraction: float, seed: int) -> tuple[list[RMPair], list[RMPair]]:
    """(train, held-out) with whole prompts held out, so ACC+ sees every pair of a held-out prompt."""
    prompt_ids = sorted({p.prompt_id for p in pairs})
    random.Random(seed).shuffle(prompt_ids)
    n_eval = math.ceil(eval_fraction * len(prompt_ids)) if len(prompt_ids) > 1 else 0
    held = set(prompt_ids[:n_eval])
    return [p for p in pairs if p.prompt_id not in held], [p for p in pairs if p.prompt_id in held]


def fit(
    rm: RewardModel,
    pairs: Sequence[RMPair],
    *,
    steps: int,
    batch_size: int = 4,
    learning_rate: float = 1e-4,
    weights: LossWeights = LossWeights(),
    use_critiques: bool = True,
    seed: int = 0,
    metrics_path: Path | None = None,
    checkpoint_dir: Path | None = None,
    save_steps: int = 50,
    resume_from: str | Path | None = None,
) -> list[dict[str, float]]:
    """Train `rm` in place for `steps` AdamW steps of `batch_size` pairs; returns the metrics of the steps it ran.

    With `checkpoint_dir` the loop state is saved every `save_steps`; `resume_from` (a checkpoint of
    the same pairs and settings) continues from there.
    """
    torch.manual_seed(seed)
    features = [pair_features(rm.processor, p, use_critiques) for p in pairs]
    margins = torch.tensor([p.margin for p in pairs])
    pad_id = rm.processor.tokenizer.pad_token_id
    params = [p for p in rm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    shuffler = torch.Generator().manual_seed(seed)
    order: list[int] = []
    history = []
    start = 0
    if resume_from is not None:
        start, extra = load_checkpoint(resume_from, modules={"rm": rm}, optimizer=optimizer)
        order = extra["order"]
        shuffler.set_state(extra["shuffler"])
    rm.train()
    for step in range(start + 1, steps + 1):
        while len(order) < batch_size:  # epochs of shuffled pairs
            order += torch.randperm(len(pairs), generator=shuffler).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        # chosen answers first, then rejected, in one forward pass
        batch = collate([features[i][0] for i in idx] + [features[i][1] for i in idx], pad_id, side="left")
        out = rm(**batch)
        r_chosen, r_rejected = out.rewards[: len(idx)], out.rewards[len(idx) :]
        loss, parts = reward_loss(r_chosen, r_rejected, margins[idx], out.critique_logits, out.critique_targets, weights)
        finite(loss.item(), f"reward model step {step}: the loss")
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        parts.update(step=step, accuracy=(r_chosen > r_rejected).float().mean().item())
        history.append(parts)
        if metrics_path is not None:
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(parts) + "\n")
        if checkpoint_dir is not None and step % save_steps == 0 and step < steps:
            save_checkpoint(checkpoint_dir, step, modules={"rm": rm}, optimizer=optimizer,
                            extra={"order": order, "shuffler": shuffler.get_state()}, keep=1)  # fmt: skip
    return history


def train_reward_model(
    pairs_path: Path,
    out_dir: Path,
    cfg: RewardModelConfig = RewardModelConfig(),
    *,
    model: str,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a reward model on a pairs file into `out_dir/model`; returns a summary with held-out ACC/ACC+.

    The settings are the `reward_model` section's. Pair rationales are the critiques
    (`cfg.use_critiques`); pairs without one train the score only. The held-out evaluation scores as
    `score_options(cfg)` says.
    """
    weights = LossWeights(cfg.critique_weight, cfg.margin_weight, cfg.tie_weight, cfg.center_weight)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics, checkpoints = out_dir / "metrics.jsonl", out_dir / "checkpoints"

    # set-up
    train_pairs, held_out = split_by_prompt(read_rm_pairs(pairs_path), cfg.eval_fraction, seed)
    torch.manual_seed(seed)
    rm = build_reward_model(model, cfg.finetune, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                            lora_dropout=cfg.lora_dropout, target_modules=cfg.target_modules)  # fmt: skip

    # resume: the last complete checkpoint of a run with these pairs and settings (more steps extend a run)
    settings = {"pairs": rm_pairs_digest(pairs_path), "model": model, "seed": seed,
                "config": cfg.model_dump(mode="json", exclude={"max_steps", "save_steps", "checkpoint"})}  # fmt: skip
    last = resume_point(out_dir, settings, checkpoints, metrics)

    # train
    history = fit(rm, train_pairs, steps=cfg.max_steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                  weights=weights, use_critiques=cfg.use_critiques, seed=seed, metrics_path=metrics,
                  checkpoint_dir=checkpoints, save_steps=cfg.save_steps, resume_from=last)  # fmt: skip

    # save, then evaluate on held-out prompts
    path = rm.save(out_dir / "model")
    shutil.rmtree(checkpoints, ignore_errors=True)
    summary: dict[str, Any] = {"model": str(path), "train_pairs": len(train_pairs), "final": history[-1] if history else {}}
    if held_out:
        summary["held_out"] = evaluate_pairs(rm, held_out, seed=seed, **score_options(cfg))
    return summary
