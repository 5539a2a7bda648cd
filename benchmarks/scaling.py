"""Scaling: steps per second of each trainer at 1 and N processes on the same global batch.

    uv run python benchmarks/scaling.py                 # N = 2 gloo processes on a CPU, or N = the visible GPUs
    uv run python benchmarks/scaling.py --trainers sft,dpo --processes 4

Each trainer runs as a real `alignkit run` (a fresh process, on a copy of one base run directory)
with a short and a long number of steps; steps per second is (long − short) / (t_long − t_short) of the
stage's own seconds in stages.json, so model loading, process start-up and saving cancel out and
what remains is the cost of a training step. The same global batch means 1 process × batch B
against N processes × batch B / N. On a CPU every set-up gets all the cores (OMP_NUM_THREADS =
cores / processes per process), so the ratio is what splitting a step over processes costs or
gains against threads; on GPUs the efficiency (ratio / N) is the N-GPU scaling efficiency. The
overhead per step is the N-process step time minus the 1-process step time / N (what an ideal
split would take).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from runs import ROOT, alignkit_run, case_dir, error_line, make_base, summaries


@dataclass
class Trainer:
    name: str
    stage: str
    steps_key: str  # the recipe key of its number of steps
    batch_key: str  # the recipe key of its per-process batch
    global_batch: int  # examples (PPO: prompts) per step, whatever the split
    steps: tuple[int, int]  # the short and the long run: enough steps that their difference outweighs start-up noise
    overrides: tuple[str, ...] = ()


TRAINERS = [
    Trainer("sft", "sft", "sft.max_steps", "sft.batch_size", 8, (10, 150)),
    Trainer("dpo", "train", "train.max_steps", "train.batch_size", 4, (10, 160)),
    Trainer("mmdpo", "train", "train.max_steps", "train.batch_size", 4, (10, 160), ("train.method=mmdpo",)),
    Trainer("reward_model", "reward_model", "reward_model.max_steps", "reward_model.batch_size", 4, (10, 160)),
    Trainer("ppo", "train", "ppo.steps", "ppo.prompts_per_step", 4, (2, 12), ("train.method=ppo",)),
]


def measure(trainer: Trainer, processes: int, steps: int, base: Path, out: Path, cores: int) -> float:
    """Seconds of the trainer's stage for `steps` steps as `processes` processes."""
    name = f"{trainer.name}-{processes}p-{steps}s"
    run_dir, recipe = case_dir(base, out, name)
    overrides = [*trainer.overrides, f"{trainer.steps_key}={steps}", f"{trainer.batch_key}={trainer.global_batch // processes}",
                 f"launch.num_processes={processes}", "train.save_steps=1000", "reward_model.save_steps=1000",
                 "sft.save_steps=1000"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, cores // processes))}
    code, _ = alignkit_run(recipe, trainer.stage, overrides, out / f"{name}.log", env)
    if code != 0:
        sys.exit(f"{name} failed: {error_line(out / f'{name}.log')} (log: {out / f'{name}.log'})")
    done = summaries(run_dir, trainer.stage)
    shutil.rmtree(run_dir)
    return float(done[0]["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainers", default=",".join(t.name for t in TRAINERS))
    parser.add_argument("--processes", type=int, default=None, help="N (default: the visible GPUs, or 2 on a CPU)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every trainer's step counts")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "scaling")
    args = parser.parse_args()

    import torch

    n = args.processes or max(2, torch.cuda.device_count())
    cores = len(os.sched_getaffinity(0))
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    base, code, _ = make_base(args.out, os.environ | {"OMP_NUM_THREADS": str(cores)})
    if code != 0:
        sys.exit(f"the base run failed: {error_line(args.out / 'base.log')}")

    device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else f"CPU, {cores} cores"
    rows = [f"Scaling on {device}: the same global batch at 1 and {n} processes", "",
            f"| trainer | global batch | 1 process steps/s | {n} processes steps/s | ratio | efficiency | overhead per step |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    wanted = args.trainers.split(",")
    for trainer in (t for t in TRAINERS if t.name in wanted):
        rate = {}
        few, many = (max(1, round(s * args.scale)) for s in trainer.steps)
        for p in (1, n):
            short = measure(trainer, p, few, base, args.out, cores)
            long = measure(trainer, p, many, base, args.out, cores)
            if long <= short:
                sys.exit(f"{trainer.name}: {many} steps took no longer than {few}: too few steps to measure (raise --scale)")
            rate[p] = (many - few) / (long - short)
        ratio = rate[n] / rate[1]
        overhead = 1 / rate[n] - 1 / (rate[1] * n)
        rows.append(f"| {trainer.name} | {trainer.global_batch} | {rate[1]:.2f} | {rate[n]:.2f} | {ratio:.2f}x | "
                    f"{ratio / n:.0%} | {overhead * 1000:.0f} ms |")  # fmt: skip
        print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
