"""kill -9 at random moments, then a final run: exactly one record per sample, and nothing re-asked
but what was in flight at a kill (the judge and the OpenAI-compatible sampler, each in a real
subprocess against the real HTTP fixture)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from alignkit.records import Prompt, Sample, read_records, write_jsonl
from alignkit.testing.chat_server import ChatServer

REPO = Path(__file__).resolve().parents[1]
KEY_ENV = "ALIGNKIT_TEST_STRESS_KEY"
CONCURRENCY, KILLS = 4, 3

_JUDGE = """
import sys
from pathlib import Path
from alignkit.judge import JudgeConfig, run_judge
from alignkit.records import Prompt, Sample, read_records
d = Path(sys.argv[1])
run_judge(read_records(d / "prompts.jsonl", Prompt), read_records(d / "samples.jsonl", Sample), d / "verdicts.jsonl",
          JudgeConfig(backend="openai", model="judge-m", base_url=sys.argv[2], api_key_env=sys.argv[3],
                      concurrency=int(sys.argv[4]), max_retries=0, image_max_side=64), fingerprint="f")
"""

_SAMPLER = """
import sys
from pathlib import Path
from alignkit.records import Prompt, read_records
from alignkit.sample import SampleConfig, run_sample
d = Path(sys.argv[1])
cfg = SampleConfig(backend="openai", base_url=sys.argv[2], model_name="served", api_key_env=sys.argv[3],
                   concurrency=int(sys.argv[4]), max_retries=0, num_samples=2, max_new_tokens=8, chunk_size=8)
run_sample(read_records(d / "prompts.jsonl", Prompt), d / "samples.jsonl", cfg, fingerprint="f", model="m", seed=1)
"""


def _world(tmp_path: Path, n: int) -> list[Prompt]:
    Image.new("RGB", (32, 32), "red").save(tmp_path / "img.png")
    prompts = [Prompt(f"p{i}", f"How many circles? [p{i}]", [str(tmp_path / "img.png")], "count", "1", ["red circle"])
               for i in range(n)]  # fmt: skip
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    return prompts


def _kill_at_random_moments(script: str, tmp_path: Path, srv: ChatServer, partial: Path, rng: random.Random) -> int:
    """Start the run KILLS times, SIGKILL each once it has written something (then a random moment
    later); return how many requests were in flight at the kills, at most."""
    (tmp_path / "run.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(REPO), KEY_ENV: "sk-stress"}
    for _ in range(KILLS):
        proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(tmp_path), srv.url, KEY_ENV,
                                 str(CONCURRENCY)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        before = len(partial.read_text().splitlines()) if partial.exists() else 0
        deadline = time.monotonic() + 60
        while not (partial.exists() and len(partial.read_text().splitlines()) > before):
            if proc.poll() == 0:  # it finished between two looks: nothing left to kill
                break
            assert time.monotonic() < deadline and proc.poll() is None, "the run did not get going"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return KILLS * CONCURRENCY


@pytest.mark.slow
def test_judge_survives_kills_at_random_moments(tmp_path, monkeypatch):
    from alignkit.judge import JudgeConfig, run_judge

    prompts = _world(tmp_path, 40)
    samples = [Sample(f"{p.prompt_id}#s0", p.prompt_id, f"marker-{p.prompt_id}: one red circle. Answer: 1", "", "1",
                      True, 6, "stop") for p in prompts]  # fmt: skip
    write_jsonl(tmp_path / "samples.jsonl", samples)
    with ChatServer(delay_s=0.1) as srv:
        in_flight = _kill_at_random_moments(_JUDGE, tmp_path, srv, tmp_path / "verdicts.jsonl.partial", random.Random(7))
        monkeypatch.setenv(KEY_ENV, "sk-stress")
        cfg = JudgeConfig(backend="openai", model="judge-m", base_url=srv.url, api_key_env=KEY_ENV, max_retries=0,
                          image_max_side=64, concurrency=CONCURRENCY)  # fmt: skip
        summary = run_judge(prompts, samples, tmp_path / "verdicts.jsonl", cfg, fingerprint="f")
        asked = [r.text() for r in srv.chat_requests]
    records = [json.loads(line) for line in (tmp_path / "verdicts.jsonl").read_text().splitlines()]
    assert sorted(r["sample_id"] for r in records) == sorted(s.sample_id for s in samples)  # one each
    assert summary["ok"] == 40 and summary["resumed"] > 0
    assert len(asked) <= len(samples) + in_flight  # only requests in flight at a kill were asked again
    assert all(sum(f"marker-{p.prompt_id}:" in t for t in asked) <= 1 + KILLS for p in prompts)


@pytest.mark.slow
def test_openai_sampler_survives_kills_at_random_moments(tmp_path, monkeypatch):
    from alignkit.sample import SampleConfig, run_sample

    prompts = _world(tmp_path, 32)
    with ChatServer(delay_s=0.1) as srv:
        in_flight = _kill_at_random_moments(_SAMPLER, tmp_path, srv, tmp_path / "samples.jsonl.partial", random.Random(8))
        monkeypatch.setenv(KEY_ENV, "sk-stress")
        cfg = SampleConfig(backend="openai", base_url=srv.url, model_name="served", api_key_env=KEY_ENV,
                           concurrency=CONCURRENCY, max_retries=0, num_samples=2, max_new_tokens=8, chunk_size=8)  # fmt: skip
        summary = run_sample(prompts, tmp_path / "samples.jsonl", cfg, fingerprint="f", model="m", seed=1)
        asked = len(srv.chat_requests)
    samples = read_records(tmp_path / "samples.jsonl", Sample)
    assert sorted(s.sample_id for s in samples) == sorted(f"p{i}#s{k}" for i in range(32) for k in range(2))
    assert summary["num_samples"] == 64 and summary["resumed_prompts"] > 0
    assert asked <= len(prompts) + in_flight  # one request per prompt (n=2), plus those cut by a kill
    with ChatServer(delay_s=0.0) as straight_srv:  # the same file as a run never killed
        monkeypatch.setenv(KEY_ENV, "sk-stress")
        run_sample(prompts, tmp_path / "straight.jsonl", cfg.model_copy(update={"base_url": straight_srv.url}),
                   fingerprint="f", model="m", seed=1)  # fmt: skip
    assert (tmp_path / "samples.jsonl").read_text() == (tmp_path / "straight.jsonl").read_text()
