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
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "accelerate"
SHARDED = ("fsdp", "zero2", "zero3")

RECIPE = """\
output_dir: {out}
seed: 0
policy: {{model: "tiny:qwen2-vl"}}
data: {{synthetic: {{num_prompts: 8, seed: 0}}}}
sft: {{synthetic: {{num_examples: 64}}, max_steps: 8, batch_size: 4, warmup_steps: 1, logging_steps: 1}}
sample: {{backend: vllm, num_samples: 4, max_new_tokens: 24, template: plain, vllm: {{kv_cache_memory: 0.25}}}}
judge: {{backend: reference, rubric: overall}}
pairs: {{strategy: threshold}}
train: {{method: dpo, batch_size: 2, max_steps: 4, save_steps: 2}}
reward_model: {{finetune: lora, max_steps: 4, batch_size: 2, save_steps: 2, max_critique_tokens: 16}}
ppo: {{steps: 2, prompts_per_step: 2, ppo_epochs: 1, num_minibatches: 1}}
eval: {{synthetic: {{num_prompts: 8, seed: 9}}, max_new_tokens: 24}}
"""


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


def alignkit_run(recipe: Path, stages: str, overrides: list[str], log: Path, env: dict[str, str]) -> tuple[int, float]:
    """`alignkit run RECIPE --stages STAGES OVERRIDES`; its output goes to `log`. Returns (exit code, seconds)."""
    start = time.monotonic()
    with log.open("w") as f:
        code = subprocess.run([sys.executable, "-m", "alignkit", "run", str(recipe), "--stages", stages, *overrides],
                              stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode  # fmt: skip
    return code, time.monotonic() - start


def error_line(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines()
    found = next((ln for ln in reversed(lines) if ln.startswith("error:") or "Error" in ln), lines[-1] if lines else "")
    return found.strip()[:160]


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
    base = args.out / "base"
    recipe = args.out / "recipe.yaml"
    recipe.write_text(RECIPE.format(out=base))
    rows: list[tuple[str, ...]] = []
    code, seconds = alignkit_run(recipe, "sft,prompts,sample,judge,pairs", [], args.out / "base.log", env)
    rows.append(("base: sft, prompts, sample, judge, pairs", "1", "-", f"{seconds:.0f}",
                 "ok" if code == 0 else f"FAIL: {error_line(args.out / 'base.log')}"))  # fmt: skip
    if code != 0:
        return report(rows, args.out, gpus, args.cpu)

    for i, case in enumerate(cases(gpus)):
        if args.only and args.only not in case.name:
            continue
        where = f"{case.processes}" + (f" ({case.config})" if case.config else "")
        if args.cpu and case.config in SHARDED:
            rows.append((case.name, where, "-", "-", "skipped: FSDP and DeepSpeed need GPUs"))
            continue
        run_dir = args.out / f"case-{i:02d}"
        shutil.copytree(base, run_dir)
        case_recipe = args.out / f"case-{i:02d}.yaml"
        case_recipe.write_text(RECIPE.format(out=run_dir))
        overrides = list(case.overrides)
        if case.processes > 1:
            overrides.append(f"launch.num_processes={case.processes}")
            if case.config and not args.cpu:  # on CPUs the runner's torchrun starts gloo processes
                overrides.append(f"launch.config_file={CONFIGS / (case.config + '.yaml')}")
        log = args.out / f"case-{i:02d}.log"
        code, seconds = alignkit_run(case_recipe, case.stages, overrides, log, env)
        stages = json.loads((run_dir / "stages.json").read_text()) if (run_dir / "stages.json").exists() else {}
        summaries = [v.get("summary", {}) for k, v in stages.items() if k.split("@")[0] in case.stages.split(",")]
        precision = ",".join(sorted({str(s["mixed_precision"]) for s in summaries if "mixed_precision" in s})) or "-"
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
