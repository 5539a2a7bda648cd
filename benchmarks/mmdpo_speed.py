"""Training steps per second: alignkit's MM-DPO (cached reference log-probs) vs stock `trl.DPOTrainer`.

    python benchmarks/mmdpo_speed.py [--steps 20] [--warmup 3] [--batch-size 4] [--pairs 64] [--repeats 2]

Both run on the same tiny Qwen2-VL (built offline), the same pairs, batch, LoRA settings and
seed, each in its own subprocess so that peak memory is per trainer; the variants alternate
`--repeats` times and the fastest run of each is kept (other jobs on a shared machine only slow
a run down). Stock TRL runs a reference
forward (adapter disabled) in every step; MM-DPO computes the reference log-probs once before
training (timed separately, as `precompute s`) and runs one forward per step.

Peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the process's peak resident set
size (`ru_maxrss`, which includes the Python/torch runtime both variants share; tracemalloc does
not see torch's allocations), so compare the difference, not the ratio.
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

import torch
from transformers import TrainerCallback

COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]


class StepTimer(TrainerCallback):
    """Wall and process CPU time from the start of step `warmup` to the end of the last step.

    CPU time (all threads) is printed too: on a shared machine other jobs stretch wall time.
    """

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, (0.0, 0.0), (0.0, 0.0)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.end = (time.perf_counter(), time.process_time())


def write_pairs(dir: Path, n: int) -> Path:
    """`n` pairs over 112x112 single-colour images, with margins spread over [0, 3]."""
    from PIL import Image

    lines = []
    for i in range(n):
        color = COLORS[i % len(COLORS)]
        Image.new("RGB", (112, 112), color).save(dir / f"img{i}.png")
        pair = {
            "pair_id": f"p{i}",
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
            "chosen": [{"role": "assistant", "content": f"Let me look at the image step by step. There is a {color} square."}],
            "rejected": [{"role": "assistant", "content": "Let me look at the image step by step. There is a circle."}],
            "images": [f"img{i}.png"],
            "margin": 3.0 * i / n,
        }
        lines.append(json.dumps(pair) + "\n")
    (dir / "pairs.jsonl").write_text("".join(lines))
    return dir / "pairs.jsonl"


def run_variant(variant: str, model: str, pairs: Path, out: Path, steps: int, warmup: int, batch_size: int) -> dict:
    """Train `warmup + steps` steps with one trainer; its timing and peak memory."""
    from trl import DPOTrainer

    from alignkit.data.preference import COLUMNS, load_preference_dataset
    from alignkit.models import load_policy, lora_config
    from alignkit.train.common import dpo_config
    from alignkit.train.config import TrainConfig
    from alignkit.train.mmdpo import MMDPOTrainer, dynamic_beta
    from alignkit.train.reference import pair_key

    dataset = load_preference_dataset(pairs, keep={"pair_id": str, "margin": float})
    policy, processor = load_policy(model)
    cfg = TrainConfig(method="mmdpo", beta=0.1, learning_rate=1e-4, max_steps=warmup + steps, batch_size=batch_size,
                      max_length=512, save_steps=10_000)  # fmt: skip
    args = dpo_config(out, cfg, seed=0, logging_steps=10_000)
    timer = StepTimer(warmup)
    common = dict(model=policy, args=args, processing_class=processor, peft_config=lora_config(), callbacks=[timer])
    precompute = 0.0
    if variant == "trl":
        trainer = DPOTrainer(train_dataset=dataset.select_columns(list(COLUMNS)), **common)
    else:
        dataset = dataset.add_column("beta", [dynamic_beta(m) for m in dataset["margin"]])
        trainer = MMDPOTrainer(train_dataset=dataset, **common)
        keys = [pair_key(*r) for r in zip(dataset["pair_id"], dataset["prompt"], dataset["chosen"], dataset["rejected"])]
        cache = out / "ref_logps.jsonl"
        cache.unlink(missing_ok=True)  # each repeat pays the one-time precompute
        start = time.perf_counter()
        trainer.cache_reference_logps(cache, keys)
        precompute = time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "steps_per_s": steps / (timer.end[0] - timer.start[0]),
            "cpu_s_per_step": (timer.end[1] - timer.start[1]) / steps, "precompute_s": precompute,
            "peak_mib": peak / 2**20, "memory": "cuda max allocated" if torch.cuda.is_available() else "peak RSS"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per variant; the fastest is kept")
    parser.add_argument("--variant", choices=["trl", "mmdpo"], help=argparse.SUPPRESS)  # internal: one subprocess
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()

    if opts.variant:
        result = run_variant(opts.variant, str(opts.workdir / "model"), opts.workdir / "pairs.jsonl",
                             opts.workdir / opts.variant, opts.steps, opts.warmup, opts.batch_size)  # fmt: skip
        print("RESULT " + json.dumps(result))
        return

    from alignkit.models import build_tiny_qwen2_vl

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_tiny_qwen2_vl(work / "model")
        write_pairs(work, opts.pairs)
        results: dict[str, dict] = {}
        for _ in range(opts.repeats):
            for variant in ("trl", "mmdpo"):
                cmd = [sys.executable, __file__, "--variant", variant, "--workdir", tmp, "--steps", str(opts.steps),
                       "--warmup", str(opts.warmup), "--batch-size", str(opts.batch_size)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                r = json.loads(out.split("RESULT ", 1)[1])
                if variant not in results or r["steps_per_s"] > results[variant]["steps_per_s"]:
                    results[variant] = r

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"tiny Qwen2-VL, LoRA r=8, batch {opts.batch_size}, {opts.steps} timed steps after {opts.warmup}, "
          f"best of {opts.repeats}, on {device}")
    print(f"{'trainer':<28} {'steps/s':>8} {'CPU s/step':>11} {'precompute s':>13} {'peak MiB':>9}  memory")
    names = {"trl": "trl.DPOTrainer", "mmdpo": "alignkit MM-DPO (cached ref)"}
    for variant, r in results.items():
        print(f"{names[variant]:<28} {r['steps_per_s']:>8.2f} {r['cpu_s_per_step']:>11.2f} {r['precompute_s']:>13.1f} "
              f"{r['peak_mib']:>9.0f}  {r['memory']}")  # fmt: skip
    trl, ours = results["trl"], results["mmdpo"]
    print(f"speed-up: {ours['steps_per_s'] / trl['steps_per_s']:.2f}x in steps/s, "
          f"{trl['cpu_s_per_step'] / ours['cpu_s_per_step']:.2f}x in CPU time per step (goal >= 1.3x)")


if __name__ == "__main__":
    main()
