"""DPO with LoRA on a vision-language policy, through TRL's `DPOTrainer`.

Reads top to bottom: set-up (pairs, policy, config), resume point, train, save. The run directory
and the resume rules are described in `alignkit.train.common`.
"""

from __future__ import annotations

from pathlib import Path

from alignkit.data.preference import load_preference_dataset
from alignkit.models import load_policy, lora_config
from alignkit.records import file_digest
from alignkit.tracking import Tracking
from alignkit.train.common import (
    MetricsJsonl,
    dpo_config,
    drop_overlong,
    pair_ids,
    resume_point,
    save_final,
    show_progress,
)
from alignkit.train.config import TrainConfig


def train_dpo(
    pairs_path: Path,
    out_dir: Path,
    cfg: TrainConfig = TrainConfig(),
    *,
    model: str,
    seed: int = 0,
    logging_steps: int = 1,
    tracking: Tracking | None = None,
) -> Path:
    """Train a LoRA adapter with DPO on a pairs file as the `train` section `cfg` says; returns `out_dir/adapter`.

    `model` is a hub id, a local directory or a tiny test model name ("tiny:qwen2-vl").
    `cfg.beta` is the DPO temperature (0.1 as in the DPO paper); `max_steps` > 0 overrides
    `num_epochs`; a pair whose prompt + answer tokens (image tokens included) exceed `max_length`
    stops the run or is skipped, as `cfg.overlong` says (the skipped ids go to `out_dir/overlong.json`).
    `target_modules` are projection names inside the language model (see `lora_config`). `tracking`
    is the tracker run the logged steps also go to (`alignkit.tracking`).
    """
    from trl import DPOTrainer

    from alignkit.models import resolve_model
    from alignkit.models.device import ComputeSettings, process_state

    pairs_path, out_dir = Path(pairs_path), Path(out_dir)
    model_path, compute = resolve_model(model), ComputeSettings.of(cfg)

    # set-up
    dataset = load_preference_dataset(pairs_path)
    policy, processor = load_policy(model_path, dtype=compute.dtype(), **compute.load_options())
    dataset = drop_overlong(dataset, pair_ids(pairs_path), processor, policy.config, cfg, out_dir)
    peft_config = lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, model=policy)
    args = dpo_config(out_dir, cfg, seed=seed, logging_steps=logging_steps)

    # resume point: anything that changes what is learned invalidates old checkpoints
    settings = {
        "pairs": file_digest(pairs_path),
        "model": model_path,
        "dpo": [cfg.beta, cfg.learning_rate, cfg.batch_size, cfg.grad_accum, cfg.max_length, seed],
        "processes": process_state().num_processes,  # batch_size is per process
        "lora": [cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules],
        "compute": [compute.precision(), compute.attn_implementation],
    }
    resume_from = resume_point(out_dir, settings)

    # train
    trainer = DPOTrainer(
        model=policy,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[MetricsJsonl(out_dir / "metrics.jsonl", tracking)],
    )
    show_progress(trainer)
    trainer.train(resume_from_checkpoint=resume_from)

    # save: `adapter/` only ever holds a finished adapter (weights, adapter_config.json, processor)
    return save_final(trainer, out_dir / "adapter")
