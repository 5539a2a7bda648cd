"""MM-DPO (MM-RLHF, Kwai 2025): DPO with a per-pair beta scaled by the pair's reward margin.

    β(δ) = β_ori · (1 + w · (1 − exp(−k·δ)))

δ is the pair's reward margin (chosen minus rejected): the judge's `margin` by default, or any
numeric column of the pairs file named by `margin_key` (e.g. `rm_margin`, written when a critique
reward model scores the pairs). Pairs the reward model is sure about get a larger β, i.e. a loss
that keeps the policy closer to the reference on them while pushing harder on their ranking.
w = 0 is plain DPO. An optional NLL term (weight γ) on the chosen answer is TRL's `sft` loss.

Reference log-probs are computed once, before training, and cached on disk
(`ref_cache_dir/<model fingerprint>.jsonl`, by default `out_dir/ref_logps/`; see
`alignkit.train.reference`), so each training step runs one model forward instead of two. Reads top to bottom: set-up, resume point, reference
log-probs, train, save; the run directory and resume rules are those of `alignkit.train.common`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from trl import DPOTrainer

from alignkit.console import progress
from alignkit.data.preference import COLUMNS, load_preference_dataset
from alignkit.errors import finite
from alignkit.models import load_policy, lora_config, quantization_4bit
from alignkit.records import file_digest
from alignkit.tracking import Tracking
from alignkit.train.common import MetricsJsonl, dpo_config, drop_overlong, resume_point, save_final, show_progress
from alignkit.train.config import TrainConfig
from alignkit.train.reference import append_cache, pair_key, read_cache, reference_fingerprint

# Batch columns the trainer must keep and carry to `compute_loss` beside the processor outputs.
PAIR_COLUMNS = ("beta", "ref_chosen_logps", "ref_rejected_logps")


def dynamic_beta(margin: float, beta: float = 0.1, w: float = 0.5, k: float = 0.5) -> float:
    """MM-DPO's β for one pair (paper defaults); a negative margin counts as 0, so β never drops below `beta`."""
    return beta * (1.0 + w * (1.0 - math.exp(-k * max(margin, 0.0))))


@dataclass
class WithPairColumns:
    """Wraps TRL's vision collator (which returns only processor outputs) to add the per-pair columns."""

    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        columns = [c for c in PAIR_COLUMNS if c in examples[0]]
        extra = {c: torch.tensor([ex.pop(c) for ex in examples], dtype=torch.float32) for c in columns}
        batch = self.collator(examples)
        batch.update(extra)
        return batch


class MMDPOTrainer(DPOTrainer):
    """TRL's `DPOTrainer` with a per-pair beta and reference log-probs read from the batch.

    TRL 1.16 computes the loss and the reward metrics inline in `_compute_loss` from `self.beta`
    (one float). Every use there is elementwise over pairs, so `compute_loss` sets `self.beta` to
    the batch's (B,) beta tensor for the duration of the call: TRL's own sigmoid loss, reward
    margins and accuracies then use the per-pair beta, with no copy of TRL's 300-line loss to
    keep in step with TRL releases. With a constant beta it is exactly the stock loss (tested).
    The reference log-probs use TRL's own precomputed path (`precompute_ref_logps`, which reads
    `ref_chosen_logps`/`ref_rejected_logps` from the batch), switched on once `cache_reference_logps`
    has filled those columns, since TRL refuses to precompute them itself for vision data.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.data_collator = WithPairColumns(self.data_collator)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *PAIR_COLUMNS]

    def cache_reference_logps(self, cache: Path, keys: list[str]) -> None:
        """Compute the reference log-probs of pairs missing from `cache` (one row per key), then train from it.

        Uses TRL's `compute_ref_log_probs`, i.e. the very forward TRL runs in-step: the base model
        with the adapter disabled (LoRA/QLoRA), or the frozen initial model (full fine-tuning).
        Under a launch every process computes its share of each round of batches (one batch each);
        the main process appends the round's rows, so a kill loses at most one round; then every
        process reads the whole cache, and each process's shard of the batches finds its rows.
        """
        from accelerate.utils import gather_object

        main, rank = self.accelerator.is_main_process, self.accelerator.process_index
        size, world = self.args.per_device_train_batch_size, self.accelerator.num_processes
        cached = read_cache(cache)
        todo = [i for i, key in enumerate(keys) if key not in cached]
        model = self.ref_model or self.model
        rounds = [todo[start : start + size * world] for start in range(0, len(todo), size * world)]
        for chunk in progress(rounds, desc="reference log-probs", disable=not main or not rounds):
            mine = chunk[rank * size : (rank + 1) * size]
            rows: list[tuple[str, float, float]] = []
            if mine:
                examples = list(self.train_dataset.select(mine).select_columns(list(COLUMNS)))
                chosen, rejected = self.compute_ref_log_probs(model, self._prepare_inputs(self.data_collator(examples)))
                rows = list(zip([keys[i] for i in mine], chosen.float().tolist(), rejected.float().tolist()))
            rows = gather_object(rows)  # every process's rows, in rank order (a collective)
            if main:
                append_cache(cache, *(list(column) for column in zip(*rows)))
        self.accelerator.wait_for_everyone()
        cached = read_cache(cache)
        ds = self.train_dataset
        ds = ds.add_column("ref_chosen_logps", [cached[key][0] for key in keys])
        self.train_dataset = ds.add_column("ref_rejected_logps", [cached[key][1] for key in keys])
        self.precompute_ref_logps = True
        self.ref_model = None  # full fine-tuning: TRL loaded a frozen copy that is no longer needed

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        beta = inputs.pop("beta")
        metrics = self._metrics["train" if self.model.training else "eval"]
        all_beta = self.accelerator.gather(beta)
        metrics["beta/mean"].append(all_beta.mean().item())
        metrics["beta/min"].append(all_beta.min().item())
        metrics["beta/max"].append(all_beta.max().item())
        self.beta = beta
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self.beta = self.args.beta

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # TRL averages each metric over the logging window; the extremes must stay extremes.
        metrics = self._metrics["train" if self.model.training else "eval"]
        for key, reduce in (("beta/min", min), ("beta/max", max)):
            if metrics.get(key):
                metrics[key] = [reduce(metrics[key])]
        super().log(logs, start_time)


def train_mmdpo(
    pairs_path: Path,
    out_dir: Path,
    cfg: TrainConfig = TrainConfig(method="mmdpo"),
    *,
    model: str,
    seed: int = 0,
    logging_steps: int = 1,
    tracking: Tracking | None = None,
    ref_cache_dir: Path | None = None,
) -> Path:
    """Train with MM-DPO on a pairs file; returns `out_dir/adapter` (LoRA, QLoRA) or `out_dir/model` (full).

    From the `train` section `cfg`: `beta`, `w`, `k` are β_ori and the margin scaling of the
    per-pair beta (paper defaults 0.1, 0.5, 0.5); `gamma` weighs an NLL term on the chosen answer
    (0: off); `margin_key` names the numeric margin column (`margin` from the judge, or a reward
    model's, e.g. `rm_margin`). `finetune` is `lora`, `qlora` (4-bit base, CUDA + bitsandbytes) or
    `full`. The other settings are those of `train_dpo` (pairs over `max_length`: `cfg.overlong`).
    Every pair needs a `pair_id` (the reference cache key).
    `ref_cache_dir` holds the reference log-prob cache (default `out_dir/ref_logps`); the runner
    keeps it outside `out_dir`, which it clears when a training setting changes. `tracking` is the
    tracker run the logged steps also go to (`alignkit.tracking`).
    """
    from alignkit.models import resolve_model
    from alignkit.models.device import ComputeSettings, process_state

    finetune, margin_key, compute = cfg.finetune, cfg.margin_key, ComputeSettings.of(cfg)
    if finetune == "qlora":
        quantization_4bit(compute.dtype())  # where QLoRA cannot run, say so before loading data or a model
    pairs_path, out_dir = Path(pairs_path), Path(out_dir)

    # set-up
    dataset = load_preference_dataset(pairs_path, keep={"pair_id": str, margin_key: (int, float)})
    for pair_id, m in zip(dataset["pair_id"], dataset[margin_key]):  # a NaN margin would make beta NaN
        finite(float(m), f"{pairs_path}: pair {pair_id}: {margin_key}")
    model_path = resolve_model(model)
    policy, processor = load_policy(model_path, dtype=compute.dtype(), load_in_4bit=finetune == "qlora",
                                    **compute.load_options())
    dataset = drop_overlong(dataset, list(dataset["pair_id"]), processor, policy.config, cfg, out_dir)
    dataset = dataset.add_column("beta", [dynamic_beta(m, cfg.beta, cfg.w, cfg.k) for m in dataset[margin_key]])
    keys = [pair_key(*(row[c] for c in ("pair_id", *COLUMNS))) for row in dataset]  # one row's images at a time
    lora = None if finetune == "full" else lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, policy)
    nll = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, cfg.gamma]} if cfg.gamma else {}
    args = dpo_config(out_dir, cfg, seed=seed, logging_steps=logging_steps, **nll)

    # resume point: anything that changes what is learned invalidates old checkpoints
    settings = {
        "pairs": file_digest(pairs_path),
        "model": model_path,
        "mmdpo": [cfg.beta, cfg.w, cfg.k, cfg.gamma, margin_key, finetune, cfg.learning_rate, cfg.batch_size,
                  cfg.grad_accum, cfg.max_length, seed],
        "lora": [cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules],
        "processes": process_state().num_processes,  # batch_size is per process
        "compute": [compute.precision(), compute.attn_implementation],
    }
    resume_from = resume_point(out_dir, settings)

    # reference log-probs: once per model and pair, reused by every later run in this directory
    trainer = MMDPOTrainer(
        model=policy,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=lora,
        callbacks=[MetricsJsonl(out_dir / "metrics.jsonl", tracking)],
    )
    show_progress(trainer)
    fingerprint = reference_fingerprint(model_path, dtype=policy.dtype, qlora=finetune == "qlora", max_len=cfg.max_length)
    cache_dir = Path(ref_cache_dir) if ref_cache_dir is not None else out_dir / "ref_logps"
    trainer.cache_reference_logps(cache_dir / f"{fingerprint}.jsonl", keys)

    # train
    trainer.train(resume_from_checkpoint=resume_from)

    # save: a finished adapter (or model) with the processor, or nothing
    return save_final(trainer, out_dir / ("model" if finetune == "full" else "adapter"))
