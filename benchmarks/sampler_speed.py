"""Generated tokens per second: the vLLM backend vs the transformers backend, same model and prompts.

    python benchmarks/sampler_speed.py [--prompts 16] [--samples 4] [--max-tokens 64] [--batch-size 16]

Both backends sample the same shapes-world prompts (K answers each, up to `--max-tokens`, the
cot template, temperature 1) from the same tiny random-weight Qwen2-VL built offline. Random
weights rarely emit end-of-sequence, so nearly every sample runs to the token limit: fine for a
throughput figure. Each backend runs in its own subprocess (so peak memory is per backend): load,
one untimed warm-up call on two prompts, then one timed call on all prompts. The vLLM engine runs
in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the subprocess's peak RSS (`ru_maxrss`) covers
the engine too; on CPU that includes the KV cache vLLM reserves (`gpu_memory_utilization`, a share
of host RAM). Tokens are the samples' `num_tokens`, counted by each backend.
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


def run_backend(backend: str, workdir: Path, samples: int, max_tokens: int, batch_size: int) -> dict:
    """Load one backend, warm it up, time one call on all prompts; its throughput and peak RSS."""
    from alignkit.records import Prompt, load_image, read_records
    from alignkit.sample import Request, make_backend
    from alignkit.sample.templates import load_template

    template = load_template("cot")
    prompts = read_records(workdir / "prompts.jsonl", Prompt)
    requests = [Request(p.prompt_id, template.messages(p.question, 1), [load_image(p.images[0])]) for p in prompts]
    start = time.perf_counter()
    engine = make_backend(backend, str(workdir / "model"), max_new_tokens=max_tokens, batch_size=batch_size,
                          vllm_options=VLLM_OPTIONS)  # fmt: skip
    load_s = time.perf_counter() - start
    engine.generate(requests[:2], samples, seed=1)
    start = time.perf_counter()
    gens = engine.generate(requests, samples, seed=0)
    seconds = time.perf_counter() - start
    tokens = sum(g.num_tokens for gs in gens for g in gs)
    return {"backend": backend, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "load_s": load_s, "truncated": sum(g.finish_reason == "length" for gs in gens for g in gs),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4, help="K answers per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="transformers prompts per generate call")
    parser.add_argument("--backend", choices=["vllm", "transformers"], help=argparse.SUPPRESS)  # one subprocess
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    sizes = ["--samples", str(opts.samples), "--max-tokens", str(opts.max_tokens), "--batch-size", str(opts.batch_size)]

    if opts.backend:
        result = run_backend(opts.backend, opts.workdir, opts.samples, opts.max_tokens, opts.batch_size)
        print("RESULT " + json.dumps(result))
        return

    from alignkit.records import write_jsonl
    from alignkit.testing.shapes import make_shapes_prompts
    from alignkit.testing.tiny_models import build_tiny_qwen2_vl

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_tiny_qwen2_vl(work / "model")
        write_jsonl(work / "prompts.jsonl", make_shapes_prompts(work, opts.prompts, seed=0))
        env = os.environ | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        for backend in ("transformers", "vllm"):
            cmd = [sys.executable, __file__, "--backend", backend, "--workdir", tmp, *sizes]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(f"{backend} run failed:\n{out.stderr[-3000:]}")
            results[backend] = json.loads(out.stdout.split("RESULT ", 1)[1])

    print(f"tiny Qwen2-VL (random weights), {opts.prompts} prompts x K={opts.samples}, up to {opts.max_tokens} tokens, "
          f"transformers batch {opts.batch_size}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'backend':<13} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'truncated':>10} {'load s':>7} "
          f"{'peak RSS MiB':>13}")  # fmt: skip
    for r in results.values():
        print(f"{r['backend']:<13} {r['tokens']:>7} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.0f} "
              f"{r['truncated']:>10} {r['load_s']:>7.1f} {r['peak_rss_mib']:>13.0f}")  # fmt: skip
    ratio = results["vllm"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
    print(f"vLLM / transformers: {ratio:.1f}x generated tokens per second (goal on CPU >= 3x)")


if __name__ == "__main__":
    main()
