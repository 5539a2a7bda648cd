"""What gpu_check.py and scaling.py share: a small recipe on the tiny model, a base run directory
(a policy from sft, prompts, samples, verdicts, pairs) made once, and `alignkit run` as a fresh
process on a copy of it, so that a measured stage is timed on its own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

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

BASE_STAGES = "sft,prompts,sample,judge,pairs"


def alignkit_run(recipe: Path, stages: str, overrides: list[str], log: Path, env: dict[str, str]) -> tuple[int, float]:
    """`alignkit run RECIPE --stages STAGES OVERRIDES`; its output goes to `log`. Returns (exit code, seconds)."""
    start = time.monotonic()
    with log.open("w") as f:
        code = subprocess.run([sys.executable, "-m", "alignkit", "run", str(recipe), "--stages", stages, *overrides],
                              stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode  # fmt: skip
    return code, time.monotonic() - start


def error_line(log: Path) -> str:
    """The line of a failed run's output that says why (the CLI's `error:` line, else the last error)."""
    lines = log.read_text(errors="replace").splitlines()
    found = next((ln for ln in reversed(lines) if ln.startswith("error:") or "Error" in ln), lines[-1] if lines else "")
    return found.strip()[:160]


def make_base(out: Path, env: dict[str, str]) -> tuple[Path, int, float]:
    """The base run directory `out/base` (BASE_STAGES); returns it with the exit code and seconds."""
    base = out / "base"
    recipe = out / "base.yaml"
    recipe.write_text(RECIPE.format(out=base))
    code, seconds = alignkit_run(recipe, BASE_STAGES, [], out / "base.log", env)
    return base, code, seconds


def case_dir(base: Path, out: Path, name: str) -> tuple[Path, Path]:
    """A fresh copy of the base run as `out/name`, and its recipe file."""
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(base, run_dir)
    recipe = out / f"{name}.yaml"
    recipe.write_text(RECIPE.format(out=run_dir))
    return run_dir, recipe


def summaries(run_dir: Path, stages: str) -> list[dict]:
    """The stages.json summaries of `stages` (comma-separated names) in a run directory."""
    path = run_dir / "stages.json"
    entries = json.loads(path.read_text()) if path.exists() else {}
    wanted = stages.split(",")
    return [v.get("summary", {}) for k, v in entries.items() if k.split("@")[0] in wanted]
