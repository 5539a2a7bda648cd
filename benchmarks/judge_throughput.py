"""Judge throughput against a local chat server answering after a fixed delay L, concurrency C.

    python benchmarks/judge_throughput.py [--latency 1] [--concurrency 16] [--requests 160]

The ideal request rate is C/L. The baseline is a plain asyncio openai client at the same
concurrency on the same kind of requests: alignkit's rate as a share of it is its own overhead
(goal: at least 95%). The server is the test fixture
(alignkit.testing.chat_server) in its own process, so it does not share our GIL. In the same run
it measures a plain sequential openai client (rate ~ 1/L) and alignkit at concurrency 1 on the
same requests: their difference per request is alignkit's own overhead (message building with
images, cache lookups and writes, schema validation, the fsynced verdict file).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
from PIL import Image

from alignkit.judge import JudgeConfig, run_judge
from alignkit.judge.openai_judge import build_messages
from alignkit.judge.rubric import load_rubric
from alignkit.records import Prompt, Sample

KEY_ENV = "ALIGNKIT_BENCH_KEY"


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    """The fixture server in a subprocess; returns it and its base URL once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "alignkit.testing.chat_server", "--port", str(port), "--delay", str(latency)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=1)
    deadline = time.monotonic() + 120  # importing the fixture's package can take a while on a busy machine
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            client.models.list()
            return proc, url
        except openai.APIError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the fixture server did not start on {url}")


def make_world(folder: Path, n: int, tag: str) -> tuple[list[Prompt], list[Sample]]:
    """n prompts with one small image each and one sample each; `tag` makes the requests unique."""
    Image.new("RGB", (256, 256), "white").save(folder / "img.png")
    prompts = [Prompt(f"p{i}", "How many circles?", [str(folder / "img.png")], "count", "2", ["red circle"]) for i in range(n)]
    samples = [
        Sample(f"p{i}#s0", f"p{i}", f"{tag}-{i}: I see a red circle. Answer: 2", "", "2", True, 8, "stop") for i in range(n)
    ]
    return prompts, samples


def alignkit_seconds(
    prompts: list[Prompt], samples: list[Sample], url: str, folder: Path, concurrency: int
) -> tuple[float, float]:
    """(wall time of a whole judge run with a fresh output and cache, its request rate while judging)."""
    start = time.perf_counter()
    cfg = JudgeConfig(backend="openai", model="bench", base_url=url, api_key_env=KEY_ENV, concurrency=concurrency,
                      timeout=30, max_retries=0, image_max_side=256)  # fmt: skip
    summary = run_judge(prompts, samples, folder / "verdicts.jsonl", cfg, fingerprint="bench")
    seconds = time.perf_counter() - start
    assert summary["ok"] == len(samples) and summary["requests"] == len(samples), summary
    return seconds, summary["request_rate"]


def sequential_seconds(prompts: list[Prompt], samples: list[Sample], url: str) -> float:
    """Wall time of a plain openai client sending the same requests one after another."""
    rubric = load_rubric("overall")
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=30)
    messages = [build_messages(rubric, p, 256, answer=s.answer, response=s.text) for p, s in zip(prompts, samples)]
    fmt = {"type": "json_schema", "json_schema": {"name": "overall", "schema": rubric.schema, "strict": True}}
    start = time.perf_counter()
    for m in messages:
        client.chat.completions.create(model="bench", messages=m, response_format=fmt, **rubric.sampling)
    return time.perf_counter() - start


def concurrent_plain_seconds(prompts: list[Prompt], samples: list[Sample], url: str, concurrency: int) -> float:
    """Wall time of a plain asyncio openai client sending the same requests, `concurrency` at a time:
    the baseline alignkit's own overhead is measured against (no cache, no files, no validation)."""
    import asyncio

    rubric = load_rubric("overall")
    messages = [build_messages(rubric, p, 256, answer=s.answer, response=s.text) for p, s in zip(prompts, samples)]
    fmt = {"type": "json_schema", "json_schema": {"name": "overall", "schema": rubric.schema, "strict": True}}

    async def run() -> float:
        client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=30)
        slot = asyncio.Semaphore(concurrency)

        async def one(m: list) -> None:
            async with slot:
                await client.chat.completions.create(model="bench", messages=m, response_format=fmt, **rubric.sampling)

        start = time.perf_counter()
        await asyncio.gather(*(one(m) for m in messages))
        seconds = time.perf_counter() - start
        await client.close()
        return seconds

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=1.0, help="server delay L per request, seconds")
    parser.add_argument("--concurrency", type=int, default=16, help="judge.concurrency C")
    parser.add_argument("--requests", type=int, default=160, help="requests in the concurrent run")
    parser.add_argument("--sequential", type=int, default=10, help="requests in each sequential run")
    args = parser.parse_args()
    os.environ.setdefault(KEY_ENV, "bench")
    L, C, n, k = args.latency, args.concurrency, args.requests, args.sequential

    proc, url = start_server(L)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            folders = [root / name for name in ("concurrent", "alignkit1", "plain", "plain_async")]
            for f in folders:
                f.mkdir()
            concurrent, judging_rate = alignkit_seconds(*make_world(folders[0], n, "c"), url, folders[0], C)
            one_by_one, _ = alignkit_seconds(*make_world(folders[1], k, "a"), url, folders[1], 1)
            plain = sequential_seconds(*make_world(folders[2], k, "s"), url)
            plain_async = concurrent_plain_seconds(*make_world(folders[3], n, "p"), url, C)
    finally:
        proc.kill()
        proc.wait()

    rate, bound, seq_rate = n / concurrent, C / L, k / plain
    overhead_ms = (one_by_one - plain) / k * 1000
    print(f"\nserver latency L = {L:g} s, concurrency C = {C}, {n} requests")
    print(f"alignkit judge:      {rate:8.1f} req/s = {rate / bound:6.1%} of the C/L bound {bound:.1f} req/s (goal >= 90%)")
    print(f"  while judging:     {judging_rate:8.1f} req/s = {judging_rate / bound:6.1%} (the progress bar's rate: no set-up, no report)")
    async_rate = n / plain_async
    print(f"plain async client:  {async_rate:8.1f} req/s (asyncio openai client, concurrency {C}, same {n} requests)")
    print(f"alignkit's share:    {rate / async_rate:8.1%} of the plain async client (goal >= 95%)")
    print(f"sequential client:   {seq_rate:8.1f} req/s (plain openai client, {k} requests one at a time)")
    print(f"ratio:               {rate / seq_rate:8.1f}x the sequential client")
    print(f"alignkit overhead:   {overhead_ms:8.2f} ms per request (alignkit at concurrency 1 vs the plain client)")


if __name__ == "__main__":
    main()
