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

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from alignkit.errors import finite
from alignkit.models.checkpoint import resume_point  # noqa: F401 (the DPO stages import it from here)
from alignkit.records import atomic_output

if TYPE_CHECKING:
    from transformers import PreTrainedModel, Trainer
    from trl import DPOConfig

    from alignkit.train.config import TrainConfig


class MetricsJsonl(TrainerCallback):
    """Appends each logged training step to a jsonl file, flushed so a kill loses at most one line."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # logged before this step's checkpoint: a NaN loss saves no NaN weights
            finite(float(logs["loss"]), f"step {state.global_step}: the loss")
        if state.is_world_process_zero and logs and "loss" in logs:  # skip the end-of-run summary
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


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
    with atomic_output(final) as tmp:
        trainer.save_model(str(tmp))
    return final
