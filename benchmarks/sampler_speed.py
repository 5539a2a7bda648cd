"""Generated tokens per second: the vLLM backend vs the transformers backend, same model and prompts.

    python benchmarks/sampler_speed.py [--prompts 64] [--samples 8] [--max-tokens 64] [--batch-size 16]
                                       [--sizes 128x2,512x4] [--repeats 3] [--model PATH_OR_HUB_ID]

Both backends sample the same shapes-world prompts (K answers each, up to `--max-tokens`, the
cot template, temperature 1) from the same random-weight Qwen2-VL built offline, at each language
model size in `--sizes` (hidden width x layers; 128x2 is the tests' tiny model). Random weights
rarely emit end-of-sequence, so most samples run to the token limit: fine for a throughput
figure. `--model` benchmarks a real checkpoint instead (a local path or hub id of a VLM that
transformers' AutoModelForImageTextToText and vLLM both load, e.g. Qwen2-VL-2B-Instruct on a GPU).
Each backend runs in its own subprocess (so peak memory is per backend): load, one
untimed warm-up call on two prompts, then `--repeats` timed calls on all prompts, of which the
fastest counts (the shared machine's noise only ever slows a call down). The vLLM engine runs
in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the subprocess's peak RSS (`ru_maxrss`) covers
the engine too; on CPU that includes the KV cache vLLM reserves (`gpu_memory_utilization`, a share
of host RAM). On a GPU, peak GPU memory is torch's `max_memory_reserved` in that subprocess: for
vLLM mostly the KV cache it reserves (`gpu_memory_utilization`). Tokens are the samples'
`num_tokens`, counted by each backend.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VLLM_OPTIONS = {"max_model_len": 512, "distributed_executor_backend": "uni"}  # on CPU: 0.1 of host RAM for KV


def run_backend(
    backend: str, model: str, workdir: Path, samples: int, max_tokens: int, batch_size: int, repeats: int
) -> dict:
    """Load one backend, warm it up, time calls on all prompts; its best throughput and peak RSS."""
    import torch

    from alignkit.records import Prompt, load_image, read_records
    from alignkit.sample import Request, make_backend
    from alignkit.sample.templates import load_template

    template = load_template("cot")
    prompts = read_records(workdir / "prompts.jsonl", Prompt)
    requests = [Request(p.prompt_id, template.messages(p.question, 1), [load_image(p.images[0])]) for p in prompts]
    start = time.perf_counter()
    engine = make_backend(backend, model, max_new_tokens=max_tokens, batch_size=batch_size, vllm_options=VLLM_OPTIONS)
    load_s = time.perf_counter() - start
    engine.generate(requests[:2], samples, seed=1)
    seconds = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        gens = engine.generate(requests, samples, seed=0)
        seconds = min(seconds, time.perf_counter() - start)
    tokens = sum(g.num_tokens for gs in gens for g in gs)
    return {"backend": backend, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "load_s": load_s, "truncated": sum(g.finish_reason == "length" for gs in gens for g in gs),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mib": torch.cuda.max_memory_reserved() / 2**20 if torch.cuda.is_available() else 0}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8, help="K answers per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="transformers prompts per generate call")
    parser.add_argument("--sizes", default="128x2,512x4", help="language-model sizes, hidden width x layers")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per backend; the fastest counts")
    parser.add_argument("--model", help="a real VLM (path or hub id) instead of the random-weight sizes")
    parser.add_argument("--backend", choices=["vllm", "transformers"], help=argparse.SUPPRESS)  # one subprocess
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    args = ["--samples", str(opts.samples), "--max-tokens", str(opts.max_tokens), "--batch-size", str(opts.batch_size),
            "--repeats", str(opts.repeats)]  # fmt: skip

    if opts.backend:
        result = run_backend(opts.backend, opts.model, opts.workdir, opts.samples, opts.max_tokens, opts.batch_size,
                             opts.repeats)  # fmt: skip
        print("RESULT " + json.dumps(result))
        return

    import torch

    from alignkit.models import build_tiny_qwen2_vl
    from alignkit.records import write_jsonl
    from alignkit.worlds.shapes import make_shapes_prompts

    where = f"GPU ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "CPU"
    weights = opts.model or "Qwen2-VL (random weights)"
    print(f"{weights} on {where}, {opts.prompts} prompts x K={opts.samples}, up to {opts.max_tokens} tokens, "
          f"transformers batch {opts.batch_size}, best of {opts.repeats}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")  # fmt: skip
    print(f"{'model':<8} {'backend':<13} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'truncated':>10} {'load s':>7} "
          f"{'peak RSS MiB':>13} {'peak GPU MiB':>13}")  # fmt: skip
    ratios = {}
    for label in [Path(opts.model).name] if opts.model else opts.sizes.split(","):
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            if not opts.model:
                hidden, layers = map(int, label.split("x"))
                build_tiny_qwen2_vl(work / "model", hidden_size=hidden, num_layers=layers)
            write_jsonl(work / "prompts.jsonl", make_shapes_prompts(work, opts.prompts, seed=0))
            env = os.environ | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
            for backend in ("transformers", "vllm"):
                model = opts.model or str(work / "model")
                cmd = [sys.executable, __file__, "--backend", backend, "--workdir", tmp, "--model", model, *args]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode:
                    sys.exit(f"{backend} run failed:\n{out.stderr[-3000:]}")
                results[backend] = r = json.loads(out.stdout.split("RESULT ", 1)[1])
                print(f"{label:<8} {r['backend']:<13} {r['tokens']:>7} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.0f} "
                      f"{r['truncated']:>10} {r['load_s']:>7.1f} {r['peak_rss_mib']:>13.0f} {r['peak_gpu_mib']:>13.0f}",
                      flush=True)  # fmt: skip
        ratios[label] = results["vllm"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
    goal = "10x on a GPU" if torch.cuda.is_available() else "3x on CPU"
    for label, ratio in ratios.items():
        print(f"{label}: vLLM / transformers = {ratio:.1f}x generated tokens per second (goal: >= {goal})")


if __name__ == "__main__":
    main()
