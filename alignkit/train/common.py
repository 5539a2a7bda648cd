"""Set-up shared by the DPO-family stages: the run directory, the TRL config, resume and save.

The run directory:

    out_dir/checkpoints/   Trainer checkpoints (adapter, optimizer, trainer_state.json) and run.key
    out_dir/metrics.jsonl  one line per logged step: loss, rewards/*, logps/*, ...
    out_dir/adapter/       the final PEFT adapter plus the processor, written last and atomically
                           (`out_dir/model/` after full fine-tuning)

A re-run with the same pairs and settings resumes from the last complete checkpoint (`max_steps`,
`num_epochs`, `save_steps` and `logging_steps` may change, so a finished run can be extended);
other pairs or settings start over.

Under a launch (`alignkit.launch`) every process runs the same code; TRL's trainer shards the
batches. The main process alone decides the resume point (which may clear the directory) and
moves the final adapter into place; the others wait for it and take its answer.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from alignkit.console import progress, verbose
from alignkit.errors import finite
from alignkit.models import checkpoint
from alignkit.models.device import ComputeSettings, process_state
from alignkit.models.lengths import over_limit, preference_lengths, write_skipped
from alignkit.records import iter_jsonl
from alignkit.tracking import StepLog, Tracking

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import Trainer
    from trl import DPOConfig

    from alignkit.train.config import TrainConfig


class MetricsJsonl(TrainerCallback):
    """Writes each logged training step with `alignkit.tracking.StepLog` (metrics.jsonl, flushed so a
    kill loses at most one line, and the `tracking` section's tracker) from the main process."""

    def __init__(self, path: Path, tracking: Tracking | None = None):
        self.path, self.tracking, self.log = path, tracking, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.log = StepLog(self.path, self.tracking)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # logged before this step's checkpoint: a NaN loss saves no NaN weights
            finite(float(logs["loss"]), f"step {state.global_step}: the loss")
        if self.log and logs and "loss" in logs:  # skip the end-of-run summary
            self.log.write({"step": state.global_step, **logs})

    def on_train_end(self, args, state, control, **kwargs):
        if self.log:
            self.log.close()


class TrainProgress(ProgressCallback):
    """The trainer's progress bar, named `train`, with the last loss on it. The dicts the stock bar
    prints at every logged step go to metrics.jsonl instead (`MetricsJsonl`); `alignkit -v` prints them too."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = progress(total=state.max_steps, desc="train", unit="step")
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if verbose():
            super().on_log(args, state, control, logs=logs, **kwargs)
        elif self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{float(logs['loss']):.4g}", refresh=False)


def show_progress(trainer: Trainer) -> None:
    """Put `TrainProgress` in place of `trainer`'s stock progress bar."""
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(TrainProgress)


def dpo_config(
    out_dir: Path, cfg: TrainConfig, *, seed: int, logging_steps: int, **extra: Any
) -> DPOConfig:
    """TRL's `DPOConfig` for a run in `out_dir` from the `train` section (precision and memory keys as
    `alignkit.models.device` resolves them); `extra` passes further `DPOConfig` fields (loss types)."""
    from trl import DPOConfig

    return DPOConfig(
        beta=cfg.beta,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length,
        logging_steps=logging_steps,
        **trainer_args(out_dir, cfg, seed=seed),
        **extra,
    )


def trainer_args(out_dir: Path, cfg: TrainConfig, *, seed: int) -> dict[str, Any]:
    """The `TrainingArguments` every TRL-based stage shares: checkpoints in `out_dir/checkpoints`
    every `save_steps`, the learning rate, seed, precision and memory keys of the `train` section."""
    on_gpu, compute = torch.cuda.is_available(), ComputeSettings.of(cfg)
    precision = compute.precision()
    return dict(
        output_dir=str(out_dir / "checkpoints"),
        learning_rate=cfg.learning_rate,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # Without a GPU, say so: transformers then starts accelerate's CPU processes (gloo) under a
        # launch; otherwise each process would train alone on its own shard.
        use_cpu=not on_gpu,
        gradient_checkpointing=compute.checkpointing(),
        dataloader_pin_memory=on_gpu,
        report_to="none",
    )


def pair_ids(pairs_path: Path) -> list[str]:
    """Each pair's `pair_id` in file order (`<file>:<line>` where it has none)."""
    path = Path(pairs_path)
    return [str(obj.get("pair_id", f"{path.name}:{lineno}")) for lineno, obj in iter_jsonl(path)]


def drop_overlong(
    dataset: Dataset, ids: list[str], processor: Any, config: Any, cfg: TrainConfig, out_dir: Path
) -> Dataset:
    """`dataset` without its pairs longer than `cfg.max_length` (image tokens counted as TRL's collator
    counts them), which `train.overlong: skip` leaves out (their ids go to `out_dir/overlong.json`);
    under `stop` a `StageInputError` names them. `ids` name the dataset's rows, `config` is the
    policy's (its image-token ids). See `alignkit.models.lengths`."""
    lengths = preference_lengths(processor, dataset, ids, config) if cfg.max_length is not None else []
    skipped = over_limit(lengths, cfg.max_length, cfg.overlong, "train.max_length")
    if process_state().is_main_process:
        write_skipped(out_dir, skipped)
    return dataset.select([i for i, id_ in enumerate(ids) if id_ not in skipped]) if skipped else dataset


def resume_point(out_dir: Path, settings: Any) -> str | None:
    """`alignkit.models.checkpoint.resume_point`, decided by the main process (it may clear `out_dir`'s
    checkpoints and metrics) and broadcast to the others of a launch."""
    from accelerate.utils import broadcast_object_list

    state = process_state()
    answer = [checkpoint.resume_point(out_dir, settings) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(answer)  # a collective: the others wait here for the main process
    return answer[0]


def save_final(trainer: Trainer, final: Path) -> Path:
    """Save the trained adapter (or full model) and the processor to `final`, via a temporary name.

    Every process calls `save_model` (transformers writes on the main process only, and some
    set-ups need all of them there); the main process then renames the result onto `final`.
    """
    final = Path(final)
    tmp, main = final.with_name(final.name + ".tmp"), trainer.is_world_process_zero()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if main:
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    trainer.accelerator.wait_for_everyone()
    return final
