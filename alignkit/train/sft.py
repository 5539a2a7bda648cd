"""Supervised fine-tuning of a VLM on image+text prompt/completion conversations.

The usual step before preference training, and how the shapes recipes make a base policy from
random weights. It is a compact loop rather than TRL's `SFTTrainer`: SFTTrainer runs the image
processor in its collator on every step, which on a CPU costs more than the tiny model's forward
pass (see benchmarks/sft_speed.py); here every example is encoded once, up front.

Reads top to bottom: encode, set-up, resume, loop, save. The loss is on completion tokens only.
Checkpoints (model, optimizer, scheduler, step, RNG) go to `out_dir/checkpoints/checkpoint-N`
every `save_steps` (`alignkit.models.checkpoint`; the last one is kept); a re-run with the same data
and settings resumes from there. The final model (or LoRA adapter) is written to a temporary
directory and renamed to `out_dir/model`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from alignkit.models.checkpoint import load_checkpoint, resume_point, save_checkpoint
from alignkit.models.inputs import collate, encode
from alignkit.records import RecordError, atomic_output, file_digest, iter_jsonl, load_image
from alignkit.train.config import SftConfig


def read_sft_file(path: Path) -> list[dict[str, Any]]:
    """Read SFT examples: `prompt` and `completion` conversations (TRL's prompt-completion format)
    plus `images` (paths, relative to the file). Errors name the file and line."""
    rows = []
    for lineno, obj in iter_jsonl(path):
        missing = {"prompt", "completion"} - obj.keys()
        if missing:
            raise RecordError(f"{path}:{lineno}: missing key(s) {sorted(missing)} for an SFT example")
        images = [str((Path(path).parent / p).resolve()) for p in obj.get("images", [])]
        for p in images:
            if not Path(p).is_file():
                raise RecordError(f"{path}:{lineno}: image not found: {p}")
        rows.append({"prompt": obj["prompt"], "completion": obj["completion"], "images": images})
    if not rows:
        raise RecordError(f"{path}: no SFT examples")
    return rows


def _lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 0: the multiplier of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_sft(
    data_path: Path,
    out_dir: Path,
    cfg: SftConfig,
    *,
    model: str,
    seed: int = 0,
    logging_steps: int = 25,
) -> Path:
    """Fine-tune `model` on an SFT file; returns `out_dir/model` (full weights or a LoRA adapter).

    The settings are the `sft` section's (`cfg.data` / `cfg.synthetic` are the caller's business:
    `data_path` is the file to train on). Its defaults suit training a tiny model from scratch
    (lr 1e-3, batch 16); for a pretrained VLM use LoRA with a learning rate around 1e-4.
    """
    from alignkit.models import load_policy, lora_config, resolve_model

    data_path, out_dir = Path(data_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final, ckpt = out_dir / "model", out_dir / "checkpoints"

    # encode
    rows = read_sft_file(data_path)
    policy, processor = load_policy(resolve_model(model), dtype=torch.float32)
    examples = [encode(processor, r["prompt"], [load_image(p) for p in r["images"]], r["completion"])
                for r in tqdm(rows, desc="encode", leave=False)]  # fmt: skip
    pad_id = processor.tokenizer.pad_token_id

    # set-up
    if cfg.finetune == "lora":
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(cfg.lora_r, cfg.lora_alpha))
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_at(s, cfg.max_steps, cfg.warmup_steps))
    settings = [file_digest(data_path), model, cfg.finetune, cfg.learning_rate, cfg.max_steps, cfg.batch_size,
                cfg.warmup_steps, cfg.weight_decay, cfg.lora_r, cfg.lora_alpha, seed]  # fmt: skip

    # resume: the last complete checkpoint of a run with these settings
    step, order = 0, []
    rng = random.Random(seed)
    torch.manual_seed(seed)
    metrics = out_dir / "metrics.jsonl"
    if (last := resume_point(out_dir, settings, ckpt, metrics)) is not None:
        step, extra = load_checkpoint(last, modules={"model": policy}, optimizer=optimizer, scheduler=scheduler)
        order = extra["order"]
        rng.setstate(extra["rng"])

    # loop
    policy.train()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="sft")
    running = 0.0
    while step < cfg.max_steps:
        if len(order) < cfg.batch_size:  # a fresh shuffled epoch once the current one runs out
            order += rng.sample(range(len(examples)), len(examples))
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        batch = collate([examples[i] for i in idx], pad_id)
        loss = policy(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        running += loss.item()
        bar.update(1)
        if step % logging_steps == 0 or step == cfg.max_steps:
            n = logging_steps if step % logging_steps == 0 else step % logging_steps
            with metrics.open("a") as f:
                f.write(json.dumps({"step": step, "loss": running / n, "lr": scheduler.get_last_lr()[0]}) + "\n")
            bar.set_postfix(loss=f"{running / n:.3f}")
            running = 0.0
        if step % cfg.save_steps == 0 and step < cfg.max_steps:
            save_checkpoint(ckpt, step, modules={"model": policy}, optimizer=optimizer, scheduler=scheduler,
                            extra={"order": order, "rng": rng.getstate()}, keep=1)  # fmt: skip
    bar.close()

    # save
    with atomic_output(final) as tmp:
        policy.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if cfg.finetune == "full":
            policy.generation_config.save_pretrained(tmp)
    shutil.rmtree(ckpt, ignore_errors=True)
    return final

