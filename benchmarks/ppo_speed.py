"""PPO steps per second with transformers rollouts vs vLLM rollouts, on the same tiny Qwen2-VL.

    python benchmarks/ppo_speed.py [--steps 8] [--warmup 2] [--prompts-per-step 8] [--k 4] [--max-new-tokens 32]

Both engines run `train_ppo` with the same prompts, LoRA, hyperparameters, seed and a cheap
programmatic reward (so the rollout engine is what differs), one after the other in this process.
The first `--warmup` steps are left out (vLLM's first LoRA load, allocator warm-up). Each step is
timed by `train_ppo` itself (`step_seconds`, `rollout_seconds` in metrics.jsonl); vLLM steps
include saving the adapter and loading it into the engine. The engine's start-up is reported
apart. Prints steps/s of both and the ratio vLLM / transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def says_red(prompts, samples) -> list[float]:
    return [float("red" in s.text) for s in samples]


def run(engine: str, model: str, prompts, out: Path, args) -> dict:
    from alignkit.sample.config import SampleConfig
    from alignkit.train.config import PpoConfig, TrainConfig
    from alignkit.train.ppo import train_ppo
    from alignkit.train.rewards import RewardFn

    ppo = PpoConfig(steps=args.warmup + args.steps, prompts_per_step=args.prompts_per_step, rollout=engine)
    sample = SampleConfig(num_samples=args.k, max_new_tokens=args.max_new_tokens, template="plain",
                          vllm={"max_model_len": 512, "kv_cache_memory": 0.25})  # fmt: skip
    train = TrainConfig(method="ppo", learning_rate=1e-3, save_steps=10**6)
    started = time.perf_counter()
    train_ppo(prompts, out, ppo, model=model, reward=RewardFn("red", says_red), sample=sample, train=train,
              engine_options={"distributed_executor_backend": "uni"})  # fmt: skip
    total = time.perf_counter() - started
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = logged[args.warmup :]
    step_s = sum(s["step_seconds"] for s in steps)
    return {
        "steps_per_s": len(steps) / step_s,
        "rollout_s": sum(s["rollout_seconds"] for s in steps) / len(steps),
        "update_s": sum(s["step_seconds"] - s["rollout_seconds"] for s in steps) / len(steps),
        "torch_threads": torch.get_num_threads(),  # vLLM may change it for the process
        "tokens_per_answer": sum(s["response_length"] for s in steps) / len(steps),
        "setup_s": total - sum(s["step_seconds"] for s in logged),  # model load, engine start
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: no worker start-up

    from alignkit.models import tiny_model
    from alignkit.worlds.shapes import make_shapes_prompts

    model = str(tiny_model("tiny:qwen2-vl"))
    with tempfile.TemporaryDirectory() as tmp:
        prompts = make_shapes_prompts(Path(tmp), 64, seed=0)
        results = {engine: run(engine, model, prompts, Path(tmp) / engine, args) for engine in ("transformers", "vllm")}
    print(f"{'rollouts':<14}{'steps/s':>9}{'rollout s':>11}{'update s':>10}{'tokens/answer':>15}{'set-up s':>10}"
          f"{'threads':>9}")  # fmt: skip
    for engine, r in results.items():
        print(f"{engine:<14}{r['steps_per_s']:>9.3f}{r['rollout_s']:>11.2f}{r['update_s']:>10.2f}"
              f"{r['tokens_per_answer']:>15.1f}{r['setup_s']:>10.1f}{r['torch_threads']:>9}")  # fmt: skip
    ratio = results["vllm"]["steps_per_s"] / results["transformers"]["steps_per_s"]
    print(f"vLLM / transformers: {ratio:.2f}x steps/s "
          f"({args.prompts_per_step} prompts x K={args.k}, up to {args.max_new_tokens} new tokens, LoRA r=8)")  # fmt: skip


if __name__ == "__main__":
    main()
