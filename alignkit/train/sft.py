"""Supervised fine-tuning of a VLM on image+text prompt/completion conversations.

The usual step before preference training, and how the shapes recipes make a base policy from
random weights. It is a compact loop rather than TRL's `SFTTrainer`, for a loss normalised by the
global batch's tokens whatever its split into processes, a context check before the first step, and
a resume that keeps the data order. Every example is encoded once, up front, to disk
(`out_dir/encoded`, memory-mapped while training, kept for a resume; `alignkit.models.encoded`);
SFTTrainer runs the processor in its collator on every step (benchmarks/sft_speed.py compares them).

Reads top to bottom: encode, set-up, resume, loop, save. The loss is on completion tokens only.
Checkpoints (model, optimizer, scheduler, step, RNG) go to `out_dir/checkpoints/checkpoint-N`
every `save_steps` (`alignkit.models.checkpoint`; the last one is kept); a re-run with the same data
and settings resumes from there. The final model (or LoRA adapter) is written to a temporary
directory and renamed to `out_dir/model`.

Devices and processes come from accelerate (`alignkit.models.device`): the same loop runs as one
process or as N (torchrun / accelerate launch, see `alignkit.launch`). `batch_size` is per process;
a step takes a global batch of batch_size × grad_accum × num_processes examples from one shuffled
order, and process r trains on its own slices of it. The loss is the sum over this process's
completion tokens divided by the global batch's token count (scaled by num_processes, which DDP's
gradient mean divides back out), so every split of the same global batch takes the same step: 2
processes × batch 2 equal 1 process × batch 4, and equal batch 2 × grad_accum 2. Checkpoints hold
the whole (unsharded) state and the run key holds the global batch, not the split: a run resumes
with another process count when the global batch is unchanged; another global batch starts over.
Only the main process writes metrics, checkpoints and the model.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from alignkit.console import progress
from alignkit.errors import finite
from alignkit.models.checkpoint import load_checkpoint, resume_point, save_checkpoint
from alignkit.models.device import ComputeSettings, make_accelerator
from alignkit.models.encoded import encode_to_disk
from alignkit.models.inputs import IGNORE, collate, encode
from alignkit.models.lengths import CONTEXT, context_length, example_length, over_limit, write_skipped
from alignkit.records import RecordError, atomic_output, file_digest, iter_jsonl, load_image
from alignkit.tracking import StepLog, Tracking
from alignkit.train.config import SftConfig


def read_sft_file(path: Path, allow_outside_paths: bool = False) -> list[dict[str, Any]]:
    """Read SFT examples: `prompt` and `completion` conversations (TRL's prompt-completion format)
    plus `images` (paths, relative to the file and inside its directory unless
    `allow_outside_paths`), and an `id` (`id`, else `prompt_id`, else `<file>:<line>`). Errors name
    the file and line."""
    rows = []
    base = Path(path).parent.resolve()
    for lineno, obj in iter_jsonl(path):
        missing = {"prompt", "completion"} - obj.keys()
        if missing:
            raise RecordError(f"{path}:{lineno}: missing key(s) {sorted(missing)} for an SFT example")
        images = [str((base / p).resolve()) for p in obj.get("images", [])]
        for p in images:
            if not allow_outside_paths and not Path(p).is_relative_to(base):
                raise RecordError(f"{path}:{lineno}: image path {p} is outside {base}; set "
                                  "sft.allow_outside_paths: true to allow it")  # fmt: skip
            if not Path(p).is_file():
                raise RecordError(f"{path}:{lineno}: image not found: {p}")
        id_ = obj.get("id", obj.get("prompt_id", f"{Path(path).name}:{lineno}"))
        rows.append({"id": str(id_), "prompt": obj["prompt"], "completion": obj["completion"], "images": images})
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
    compute: ComputeSettings = ComputeSettings(),
    tracking: Tracking | None = None,
) -> Path:
    """Fine-tune `model` on an SFT file; returns `out_dir/model` (full weights or a LoRA adapter).
    Examples longer than the model's context stop the run or are skipped (`cfg.overlong`; the
    skipped ids go to `out_dir/overlong.json`).

    The settings are the `sft` section's (`cfg.data` / `cfg.synthetic` are the caller's business:
    `data_path` is the file to train on). Its defaults suit training a tiny model from scratch
    (lr 1e-3, batch 16); for a pretrained VLM use LoRA with a learning rate around 1e-4. `compute`
    holds the `train` section's precision, attention and gradient-checkpointing keys; `tracking` the
    tracker run the logged steps also go to. Run it in
    every process of a launch (see the module docstring); it returns when all are done.
    """
    from accelerate.utils import broadcast_object_list

    from alignkit.models import load_policy, lora_config, resolve_model

    data_path, out_dir = Path(data_path), Path(out_dir)
    final, ckpt = out_dir / "model", out_dir / "checkpoints"
    accelerator = make_accelerator(compute, loop="sft")
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    global_batch = cfg.batch_size * cfg.grad_accum * world
    torch.manual_seed(seed)  # the same LoRA initialisation in every process and every split

    # encode to disk (each process a share; each reads every example's tokens: the loss is normalised by
    # the global batch's)
    rows = read_sft_file(data_path, cfg.allow_outside_paths)
    # float32 weights; accelerate runs the compute in its mixed precision and places the model
    policy, processor = load_policy(resolve_model(model), dtype=torch.float32, **compute.load_options())
    encoded = encode_to_disk(
        out_dir / "encoded", rows,
        lambda r: (encode(processor, r["prompt"], [load_image(p) for p in r["images"]], r["completion"]),),
        [file_digest(data_path), model, type(processor).__name__],
        progress=lambda n: progress(total=n, desc="encode", leave=False, disable=not main),
    )  # fmt: skip
    tokens = [encoded.get(i, ("input_ids", "labels"))[0] for i in range(len(rows))]
    # never cut: an example over the model's context stops the run or is skipped (`sft.overlong`)
    lengths = [example_length(r["id"], e["input_ids"], policy.config) for r, e in zip(rows, tokens)]
    skipped = over_limit(lengths, context_length(policy.config), cfg.overlong, CONTEXT)
    kept = [i for i, r in enumerate(rows) if r["id"] not in skipped]  # the examples, as places in `encoded`
    targets = [int((tokens[i]["labels"][1:] != IGNORE).sum()) for i in kept]  # tokens the loss counts
    pad_id = processor.tokenizer.pad_token_id

    # set-up
    if cfg.finetune == "lora":
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(cfg.lora_r, cfg.lora_alpha, model=policy))
    compute.for_training(policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_at(s, cfg.max_steps, cfg.warmup_steps))
    # The scheduler is not prepared: accelerate would step it once per process on every step.
    wrapped, optimizer = accelerator.prepare(policy, optimizer)
    settings = [file_digest(data_path), model, cfg.finetune, cfg.learning_rate, cfg.max_steps, global_batch,
                cfg.warmup_steps, cfg.weight_decay, cfg.lora_r, cfg.lora_alpha, seed, compute.precision(),
                compute.attn_implementation]  # fmt: skip

    # resume: the last complete checkpoint of a run with these settings (the main process decides)
    step, order = 0, []
    rng = random.Random(seed)
    metrics = out_dir / "metrics.jsonl"
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_skipped(out_dir, skipped)
    box = [resume_point(out_dir, settings, ckpt, metrics) if main else None]
    broadcast_object_list(box)
    log = StepLog(metrics, tracking) if main else None
    if (last := box[0]) is not None:
        step, extra = load_checkpoint(last, modules={"model": policy}, optimizer=optimizer, scheduler=scheduler)
        order = extra["order"]
        rng.setstate(extra["rng"])

    # loop
    wrapped.train()
    bar = progress(total=cfg.max_steps, initial=step, desc="sft", disable=not main)
    running = 0.0
    while step < cfg.max_steps:
        if len(order) < global_batch:  # a fresh shuffled epoch once the current one runs out
            order += rng.sample(range(len(kept)), len(kept))
        idx, order = order[:global_batch], order[global_batch:]
        n_tokens = sum(targets[i] for i in idx)
        loss_sum = torch.zeros((), device=accelerator.device)
        for m in range(cfg.grad_accum):
            # micro-batch m of process r: slice m * world + r of the global batch
            part = idx[(m * world + rank) * cfg.batch_size:][:cfg.batch_size]
            batch = {k: v.to(accelerator.device) for k, v in collate([encoded[kept[i]][0] for i in part], pad_id).items()}
            sync = m == cfg.grad_accum - 1  # all-reduce the gradients once, after the last micro-batch
            with contextlib.nullcontext() if sync else accelerator.no_sync(wrapped):
                loss = wrapped(**batch, num_items_in_batch=n_tokens).loss
                accelerator.backward(loss * world)  # DDP averages over processes; we want their sum
            loss_sum += loss.detach()
        # the global batch's mean token loss, the same in every process (so all stop together if it is NaN)
        global_loss = finite(accelerator.reduce(loss_sum, "sum").item(), f"sft step {step + 1}: the loss")
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        running += global_loss
        bar.update(1)
        if log and (step % logging_steps == 0 or step == cfg.max_steps):
            n = logging_steps if step % logging_steps == 0 else step % logging_steps
            log.write({"step": step, "loss": running / n, "lr": scheduler.get_last_lr()[0]})
            bar.set_postfix(loss=f"{running / n:.3f}")
        if step % logging_steps == 0:
            running = 0.0
        if step % cfg.save_steps == 0 and step < cfg.max_steps:
            if main:
                save_checkpoint(ckpt, step, modules={"model": policy}, optimizer=optimizer, scheduler=scheduler,
                                extra={"order": order, "rng": rng.getstate()}, keep=1)  # fmt: skip
            accelerator.wait_for_everyone()
    bar.close()
    if log:
        log.close()

    # save
    accelerator.wait_for_everyone()
    if main:
        unwrapped = accelerator.unwrap_model(wrapped)
        with atomic_output(final) as tmp:
            unwrapped.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            if cfg.finetune == "full":
                unwrapped.generation_config.save_pretrained(tmp)
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(out_dir / "encoded", ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
