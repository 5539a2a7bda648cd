"""Set-up shared by the DPO-family stages: the run directory, the TRL config, resume and save.

The run directory:

    out_dir/checkpoints/   Trainer checkpoints (adapter, optimizer, trainer_state.json) and run.key
    out_dir/metrics.jsonl  one line per logged step: loss, rewards/*, logps/*, ...
    out_dir/adapter/       the final PEFT adapter plus the processor, written last and atomically
                           (`out_dir/model/` after full fine-tuning)

A re-run with the same pairs and settings resumes from the last complete checkpoint (`max_steps`,
`num_epochs`, `save_steps` and `logging_steps` may change, so a finished run can be extended);
other pairs or settings start over.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

if TYPE_CHECKING:
    from transformers import PreTrainedModel, Trainer
    from trl import DPOConfig

    from alignkit.train.config import TrainConfig


class MetricsJsonl(TrainerCallback):
    """Appends each logged training step to a jsonl file, flushed so a kill loses at most one line."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:  # skip the end-of-run summary
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drop metric lines after `step` (logged after the checkpoint we resume from) and torn lines."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        if json.loads(line)["step"] <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def resume_point(out_dir: Path, settings: dict[str, Any]) -> str | None:
    """The last complete checkpoint of a run with these `settings`, or None after clearing another run's state.

    `settings` holds everything that changes what is learned. Trainer writes `trainer_state.json`
    last, so a checkpoint without it was cut by a kill.
    """
    ckpt_dir, metrics = out_dir / "checkpoints", out_dir / "metrics.jsonl"
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    key = ckpt_dir / "run.key"
    if not (key.exists() and key.read_text().strip() == fingerprint):
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        metrics.unlink(missing_ok=True)
        ckpt_dir.mkdir(parents=True)
        key.write_text(fingerprint)
        return None
    complete = []
    for d in ckpt_dir.glob("checkpoint-*"):
        if (d / "trainer_state.json").exists():
            complete.append(d)
        else:
            shutil.rmtree(d)
    if not complete:
        metrics.unlink(missing_ok=True)
        return None
    last = max(complete, key=lambda d: int(d.name.split("-")[-1]))
    _keep_metrics_until(metrics, json.loads((last / "trainer_state.json").read_text())["global_step"])
    return str(last)


def dpo_config(
    out_dir: Path, policy: PreTrainedModel, cfg: TrainConfig, *, seed: int, logging_steps: int, **extra: Any
) -> DPOConfig:
    """TRL's `DPOConfig` for a run in `out_dir` from the `train` section; `extra` passes further
    `DPOConfig` fields (loss types)."""
    from trl import DPOConfig

    on_gpu = torch.cuda.is_available()
    return DPOConfig(
        output_dir=str(out_dir / "checkpoints"),
        beta=cfg.beta,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        logging_steps=logging_steps,
        seed=seed,
        bf16=policy.dtype == torch.bfloat16,
        # TRL turns checkpointing on to save GPU memory; on CPU it only made steps ~3x slower.
        gradient_checkpointing=on_gpu,
        dataloader_pin_memory=on_gpu,
        report_to="none",
        **extra,
    )


def save_final(trainer: Trainer, final: Path) -> Path:
    """Save the trained adapter (or full model) and the processor to `final`, via a temporary name."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
