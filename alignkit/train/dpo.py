"""DPO with LoRA on a vision-language policy, through TRL's `DPOTrainer`.

Reads top to bottom: set-up (pairs, policy, config), resume point, train, save. The run directory:

    out_dir/checkpoints/   Trainer checkpoints (adapter, optimizer, trainer_state.json) and run.key
    out_dir/metrics.jsonl  one line per logged step: loss, rewards/*, logps/*, ...
    out_dir/adapter/       the final PEFT adapter plus the processor, written last and atomically

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

import torch
from transformers import TrainerCallback

from alignkit.records import file_digest
from alignkit.train.data import load_preference_dataset
from alignkit.train.model import load_policy, lora_config


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


def _resume_point(ckpt_dir: Path, fingerprint: str, metrics: Path) -> str | None:
    """The last complete checkpoint of this same run, or None after clearing another run's state.

    Trainer writes `trainer_state.json` last, so a checkpoint without it was cut by a kill.
    """
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


def train_dpo(
    pairs_path: Path,
    out_dir: Path,
    *,
    model: str,
    beta: float = 0.1,
    learning_rate: float = 5e-5,
    num_epochs: float = 1.0,
    max_steps: int = -1,
    batch_size: int = 2,
    grad_accum: int = 1,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: list[str] | None = None,
    max_length: int | None = 512,
    save_steps: int = 50,
    seed: int = 0,
    logging_steps: int = 1,
) -> Path:
    """Train a LoRA adapter with DPO on a pairs file; returns `out_dir/adapter`.

    `model` is a hub id, a local directory or a tiny test model name ("tiny:qwen2-vl").
    `beta` is the DPO temperature (0.1 as in the DPO paper); `max_steps` > 0 overrides
    `num_epochs`; `max_length` truncates prompt+answer tokens (image tokens included).
    `target_modules` are projection names inside the language model (see `lora_config`).
    """
    from trl import DPOConfig, DPOTrainer

    from alignkit.testing.tiny_models import resolve_model

    pairs_path, out_dir = Path(pairs_path), Path(out_dir)
    model_path = resolve_model(model)

    # set-up
    dataset = load_preference_dataset(pairs_path)
    policy, processor = load_policy(model_path)
    peft_config = lora_config(lora_r, lora_alpha, lora_dropout, target_modules)
    ckpt_dir, metrics = out_dir / "checkpoints", out_dir / "metrics.jsonl"
    on_gpu = torch.cuda.is_available()
    args = DPOConfig(
        output_dir=str(ckpt_dir),
        beta=beta,
        learning_rate=learning_rate,
        num_train_epochs=num_epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        max_length=max_length,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        logging_steps=logging_steps,
        seed=seed,
        bf16=policy.dtype == torch.bfloat16,
        # TRL turns checkpointing on to save GPU memory; on CPU it only made steps ~3x slower.
        gradient_checkpointing=on_gpu,
        dataloader_pin_memory=on_gpu,
        report_to="none",
    )

    # resume point: anything that changes what is learned invalidates old checkpoints
    settings = {
        "pairs": file_digest(pairs_path),
        "model": model_path,
        "dpo": [beta, learning_rate, batch_size, grad_accum, max_length, seed],
        "lora": [lora_r, lora_alpha, lora_dropout, target_modules],
    }
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    resume_from = _resume_point(ckpt_dir, fingerprint, metrics)

    # train
    trainer = DPOTrainer(
        model=policy,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[MetricsJsonl(metrics)],
    )
    trainer.train(resume_from_checkpoint=resume_from)

    # save: to a temporary name, then rename, so `adapter/` only ever holds a finished adapter
    final, tmp = out_dir / "adapter", out_dir / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))  # adapter_config.json + weights, and the processor
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
