"""GPU check: every stage on the tiny model on one GPU in bf16 (and QLoRA), then on all visible GPUs
with DDP (and FSDP / DeepSpeed ZeRO for DPO and MM-DPO), printed as one table.

    uv sync --extra gpu && uv run python benchmarks/gpu_check.py          # on a GPU machine
    uv run python benchmarks/gpu_check.py --cpu                          # here: fp32, 2 gloo processes

Each case is a real `alignkit run` (a fresh process) on a copy of one base run directory (sft,
prompts, samples, verdicts, pairs made once), so a case's time is its own stage's. A case passes
when the command exits 0; the table gives the stage's seconds, processes and mixed precision as
its summary in stages.json records them, or the first error line. `--cpu` runs the same script on a
machine without a GPU (what CI's machines can check): bf16 cases run in fp32 (`auto`), QLoRA is
expected to stop with its clear error, N is 2 gloo processes and the sharded set-ups are skipped.
The table is printed and written to `OUT/table.md`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from runs import ROOT, alignkit_run, case_dir, error_line, make_base, summaries

CONFIGS = ROOT / "recipes" / "accelerate"
SHARDED = ("fsdp", "zero2", "zero3")


@dataclass
class Case:
    name: str
    stages: str
    overrides: list[str] = field(default_factory=list)
    processes: int = 1
    config: str | None = None  # recipes/accelerate/<config>.yaml
    cpu_error: str | None = None  # with --cpu: the clear error this case is expected to stop with


def cases(gpus: int) -> list[Case]:
    """One GPU in bf16 (auto), QLoRA, then `gpus` processes with DDP, FSDP and ZeRO."""
    one = [
        Case("sample: vllm", "sample"),
        Case("sample: transformers", "sample", ["sample.backend=transformers"]),
        Case("train: dpo", "train"),
        Case("train: mmdpo", "train", ["train.method=mmdpo"]),
        Case("train: mmdpo qlora", "train", ["train.method=mmdpo", "train.finetune=qlora"],
             cpu_error="QLoRA (finetune='qlora') loads the base model in 4 bits"),  # fmt: skip
        Case("train: ppo (transformers rollouts)", "train", ["train.method=ppo"]),
        Case("train: ppo (vllm rollouts)", "train", ["train.method=ppo", "ppo.rollout=vllm",
                                                     "sample.vllm.gpu_memory_utilization=0.3"]),  # fmt: skip
        Case("reward_model + score", "reward_model,score"),
        Case("eval: transformers", "eval"),
        Case("eval: vllm", "eval", ["eval.backend=vllm"]),
    ]
    if gpus < 2:
        return one
    many = [
        Case("sft", "sft", processes=gpus, config="ddp"),
        Case("train: dpo", "train", processes=gpus, config="ddp"),
        Case("train: mmdpo", "train", ["train.method=mmdpo"], processes=gpus, config="ddp"),
        Case("train: ppo", "train", ["train.method=ppo"], processes=gpus, config="ddp"),
        Case("reward_model + score", "reward_model,score", processes=gpus, config="ddp"),
    ]
    sharded = [
        Case(f"train: {method} full", "train", [f"train.method={method}", "train.finetune=full"], processes=gpus,
             config=config)  # fmt: skip
        for config in ("fsdp", "zero2", "zero3") for method in ("dpo", "mmdpo")
    ]
    return one + many + sharded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on a machine without a GPU (fp32, gloo processes)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    parser.add_argument("--only", help="run the cases whose name contains this text")
    args = parser.parse_args()

    import torch

    gpus = 2 if args.cpu else torch.cuda.device_count()
    if not args.cpu and gpus == 0:
        sys.exit("no GPU is visible; run with --cpu to check the script on this machine")
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)

    # the base run: a policy from sft and this round's samples, verdicts and pairs, made once
    base, code, seconds = make_base(args.out, env)
    rows: list[tuple[str, ...]] = [("base: sft, prompts, sample, judge, pairs", "1", "-", f"{seconds:.0f}",
                                    "ok" if code == 0 else f"FAIL: {error_line(args.out / 'base.log')}")]  # fmt: skip
    if code != 0:
        return report(rows, args.out, gpus, args.cpu)

    for i, case in enumerate(cases(gpus)):
        if args.only and args.only not in case.name:
            continue
        where = f"{case.processes}" + (f" ({case.config})" if case.config else "")
        if args.cpu and case.config in SHARDED:
            rows.append((case.name, where, "-", "-", "skipped: FSDP and DeepSpeed need GPUs"))
            continue
        run_dir, case_recipe = case_dir(base, args.out, f"case-{i:02d}")
        overrides = list(case.overrides)
        if case.processes > 1:
            overrides.append(f"launch.num_processes={case.processes}")
            if case.config and not args.cpu:  # on CPUs the runner's torchrun starts gloo processes
                overrides.append(f"launch.config_file={CONFIGS / (case.config + '.yaml')}")
        log = args.out / f"case-{i:02d}.log"
        code, seconds = alignkit_run(case_recipe, case.stages, overrides, log, env)
        done = summaries(run_dir, case.stages)
        precision = ",".join(sorted({str(s["mixed_precision"]) for s in done if "mixed_precision" in s})) or "-"
        if code == 0:
            result = "ok"
        elif args.cpu and case.cpu_error and case.cpu_error in log.read_text(errors="replace"):
            result = "expected on CPU: " + error_line(log)
        else:
            result = "FAIL: " + error_line(log)
        rows.append((case.name, where, precision, f"{seconds:.0f}", result))
        print(" | ".join(rows[-1]), flush=True)
    report(rows, args.out, gpus, args.cpu)


def report(rows: list[tuple[str, ...]], out: Path, gpus: int, cpu: bool) -> None:
    import torch

    device = "CPU (--cpu)" if cpu else f"{gpus} x {torch.cuda.get_device_name(0)}"
    lines = [f"GPU check on {device}, torch {torch.__version__}", "",
             "| case | processes | precision | seconds | result |", "|---|---|---|---|---|",
             *("| " + " | ".join(r) + " |" for r in rows)]  # fmt: skip
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    print(text)
    if any(r[-1].startswith("FAIL") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
