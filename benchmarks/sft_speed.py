"""SFT steps per second: alignkit's loop (examples encoded once, to disk) vs TRL's SFTTrainer, one run.

Both train the same tiny Qwen2-VL, from the same weights, on the same shapes-world SFT examples,
with the same batch size, learning rate and optimizer (AdamW), for the same number of steps.
SFTTrainer runs the processor (chat template, tokenizer, image processor) in its collator on
every step; alignkit's `train_sft` encodes each example once. Each trainer runs in its own
subprocess so peak memory (ru_maxrss) is its own.

    uv run python benchmarks/sft_speed.py [--steps 60] [--batch-size 16] [--examples 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def prepare(work: Path, examples: int) -> tuple[Path, Path]:
    from alignkit.models import build_tiny_qwen2_vl
    from alignkit.records import write_jsonl
    from alignkit.sample.templates import load_template
    from alignkit.worlds.shapes import make_shapes_prompts, sft_examples

    model = build_tiny_qwen2_vl(work / "model", seed=0)
    prompts = make_shapes_prompts(work / "data", examples, seed=1)
    data = write_jsonl(work / "data" / "sft.jsonl", sft_examples(prompts, load_template("cot"), 0.6, seed=1))
    return model, data


def run_alignkit(model: Path, data: Path, out: Path, steps: int, batch_size: int) -> float:
    from alignkit.train.config import SftConfig
    from alignkit.train.sft import train_sft

    cfg = SftConfig(data=str(data), max_steps=steps, batch_size=batch_size, warmup_steps=0, save_steps=10**9)
    start = time.perf_counter()
    train_sft(data, out, cfg, model=str(model), logging_steps=steps)
    return time.perf_counter() - start


def run_trl(model: Path, data: Path, out: Path, steps: int, batch_size: int) -> float:
    import datasets
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from alignkit.train.sft import read_sft_file

    rows = read_sft_file(data)
    ds = datasets.Dataset.from_list(rows).cast_column("images", datasets.Sequence(datasets.Image()))
    args = SFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=1e-3,
        lr_scheduler_type="cosine", save_strategy="no", report_to=[], use_cpu=True,
        gradient_checkpointing=False, max_length=None, logging_steps=steps, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=AutoModelForImageTextToText.from_pretrained(model), args=args, train_dataset=ds,
        processing_class=AutoProcessor.from_pretrained(model),
    )  # fmt: skip
    start = time.perf_counter()  # from train(): unlike alignkit's, this leaves out loading (favours TRL)
    trainer.train()
    return time.perf_counter() - start


def child(variant: str, model: str, data: str, out: str, steps: int, batch_size: int) -> None:
    fn = {"alignkit": run_alignkit, "trl": run_trl}[variant]
    seconds = fn(Path(model), Path(data), Path(out), steps, batch_size)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"variant": variant, "seconds": seconds, "peak_mib": peak_mib}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--child", nargs=4, metavar=("VARIANT", "MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.steps, args.batch_size)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data = prepare(work, args.examples)
        results = {}
        for variant in ("trl", "alignkit"):
            cmd = [sys.executable, __file__, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--child", variant, str(model), str(data), str(work / variant)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[variant] = json.loads(out.strip().splitlines()[-1])
    for v, r in results.items():
        print(f"{v:>9}: {args.steps / r['seconds']:.2f} steps/s ({r['seconds']:.1f} s for {args.steps} steps, "
              f"batch {args.batch_size}), peak RSS {r['peak_mib']:.0f} MiB")  # fmt: skip
    print(f"ratio alignkit / trl.SFTTrainer: {results['trl']['seconds'] / results['alignkit']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
