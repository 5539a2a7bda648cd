"""The openai sampling backend against the fixture server; duplicate counting and dropping."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alignkit.records import Sample, load_image, read_records, sample_id
from alignkit.sample import Generation, SampleConfig, make_backend, run_sample, sample_prompts
from alignkit.sample.base import derive_seed
from alignkit.testing.chat_server import ENVELOPE_FAULTS, FAULTS, ChatServer, heuristic_reply
from alignkit.worlds.shapes import make_shapes_prompts

K = 3
KEY_ENV = "ALIGNKIT_TEST_SAMPLER_KEY"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """Shapes prompts whose questions name their prompt id (so a fault can target one prompt)."""
    ps = make_shapes_prompts(tmp_path_factory.mktemp("shapes"), 4, seed=0)
    return [dataclasses.replace(p, question=f"{p.question} [{p.prompt_id}]") for p in ps]


def sample(server: ChatServer, prompts, out: Path, **kw) -> dict:
    cfg = SampleConfig(backend="openai", base_url=server.url, model_name="served-policy", api_key_env=KEY_ENV,
                       concurrency=4, max_retries=2, num_samples=K, max_new_tokens=16, temperature=0.7, top_p=0.9,
                       chunk_size=2, **kw)  # fmt: skip
    return run_sample(prompts, out, cfg, fingerprint="f", model="unused-locally", seed=3)


def by_id(path: Path) -> dict[str, Sample]:
    return {s.sample_id: s for s in read_records(path, Sample)}


def test_k_samples_join_back_with_images_and_seeds(prompts, tmp_path):
    with ChatServer() as server:
        summary = sample(server, prompts, tmp_path / "s.jsonl")
    samples = by_id(tmp_path / "s.jsonl")
    assert set(samples) == {sample_id(p.prompt_id, k) for p in prompts for k in range(K)}
    assert summary["num_samples"] == len(prompts) * K and summary["failed"] == [] and summary["duplicates"] == 0
    assert all(s.policy == "served-policy" and s.answer_parsed and s.finish_reason == "stop" for s in samples.values())
    assert len(server.chat_requests) == len(prompts)  # one request per prompt, n=K
    sent = {re.search(r"\[(\S+)\]", r.text()).group(1): r for r in server.chat_requests}
    for p in prompts:
        body = sent[p.prompt_id].body
        chunk_seed = derive_seed(3, "chunk", prompts.index(p) // 2)
        assert (body["n"], body["seed"], body["model"]) == (K, derive_seed(chunk_seed, p.prompt_id), "served-policy")
        assert (body["max_tokens"], body["temperature"], body["top_p"]) == (16, 0.7, 0.9)
        [url] = sent[p.prompt_id].image_urls()
        assert url.startswith("data:image/png;base64,")
        sent_img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert np.array_equal(np.asarray(sent_img), np.asarray(load_image(p.images[0])))  # lossless
        texts = [samples[sample_id(p.prompt_id, k)].text for k in range(K)]
        assert texts == heuristic_reply(body)


def test_server_ignoring_n_gets_one_request_per_missing_sample(prompts, tmp_path):
    with ChatServer(honour_n=False) as server:
        sample(server, prompts[:2], tmp_path / "s.jsonl")
    samples = by_id(tmp_path / "s.jsonl")
    assert len(samples) == 2 * K and len({s.text for s in samples.values()}) == 2 * K
    assert len(server.chat_requests) == 2 * K  # n=K (one answer back), then K-1 with n=1
    seeds = [r.body["seed"] for r in server.chat_requests]
    assert len(set(seeds)) == len(seeds)
    assert sorted(r.body["n"] for r in server.chat_requests) == [1] * (2 * K - 2) + [K] * 2


def test_server_error_is_retried_and_a_lasting_one_names_the_prompt(prompts, tmp_path):
    target = prompts[1].prompt_id
    with ChatServer() as server:
        server.inject("server_error", when=f"[{target}]")
        summary = sample(server, prompts[:2], tmp_path / "a.jsonl")
        assert summary["num_samples"] == 2 * K
        assert len(server.chat_requests) == 3  # the 500 was retried by the client
        server.inject(*["server_error"] * 3, when=f"[{target}]")  # more than max_retries
        with pytest.raises(RuntimeError, match=rf"prompt {target}: .*server_error: HTTP 500"):
            sample(server, prompts[:2], tmp_path / "b.jsonl")


def test_a_refused_prompt_is_listed_and_the_others_kept(prompts, tmp_path):
    """A 400 (e.g. a prompt over the context) skips that prompt only; its chunk-mate's answers,
    already paid for, are written without asking again."""
    target = prompts[1].prompt_id
    with ChatServer() as server:
        server.inject("bad_request", when=f"[{target}]")
        summary = sample(server, prompts[:3], tmp_path / "s.jsonl")
        assert [f["prompt_id"] for f in summary["failed"]] == [target]
        assert f"prompt {target}: the server refused it: api_error: HTTP 400" in summary["failed"][0]["error"]
        assert "maximum context length" in summary["failed"][0]["error"]
        written = {s.prompt_id for s in by_id(tmp_path / "s.jsonl").values()}
        assert written == {prompts[0].prompt_id, prompts[2].prompt_id}
        assert len(server.chat_requests) == 3  # one each, the 400 not retried, prompt 0 not asked twice


def test_every_prompt_refused_is_an_error(prompts, tmp_path):
    with ChatServer() as server:
        server.inject("bad_request", "bad_request")
        with pytest.raises(ValueError, match=r"(?s)every prompt failed \(2\), nothing was sampled.*HTTP 400"):
            sample(server, prompts[:2], tmp_path / "s.jsonl")


def test_truncated_samples_are_flagged(prompts, tmp_path):
    def reply(body):  # one answer longer than max_tokens (16 words)
        return ["short answer.\nAnswer: 1", " ".join(["word"] * 40), "two words"]

    with ChatServer(reply) as server:
        summary = sample(server, prompts[:1], tmp_path / "s.jsonl")
    s = by_id(tmp_path / "s.jsonl")
    pid = prompts[0].prompt_id
    assert [s[sample_id(pid, k)].finish_reason for k in range(K)] == ["stop", "length", "stop"]
    assert s[sample_id(pid, 1)].num_tokens == 16 and summary["truncated"] == 1
    assert sum(x.num_tokens for x in s.values()) == 16 + 4 + 2  # the reply's usage, split over choices


def test_logprobs_give_each_answer_its_exact_token_count(prompts, tmp_path):
    texts = ["a b c d e f g\nAnswer: 1", "one two", " ".join(["word"] * 40)]

    with ChatServer(lambda body: texts) as server:
        sample(server, prompts[:1], tmp_path / "s.jsonl", logprobs=True)
        assert server.chat_requests[0].body["logprobs"] is True
    s = by_id(tmp_path / "s.jsonl")
    # One token per word in the fixture; the third answer is cut at max_tokens (16).
    assert [s[sample_id(prompts[0].prompt_id, k)].num_tokens for k in range(K)] == [9, 2, 16]


def test_missing_key_and_unserved_adapter_are_clear_errors(prompts, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="sample.model_name"):
        make_backend("openai", "base", "runs/a/train/adapter", openai_options={"api_key_env": KEY_ENV})
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=f"sample.backend=openai.*{KEY_ENV}"):
        make_backend("openai", "base", openai_options={"api_key_env": KEY_ENV})


# ---------------------------------------------------------------------------------------------
# duplicates (a scripted backend: the counting does not depend on where the texts come from)


class Scripted:
    """A backend whose k-th answer to every prompt is `texts[k]`; counts its calls."""

    policy = "scripted"
    seeds_per_prompt = True

    def __init__(self, texts: list[str]):
        self.texts, self.calls = texts, 0

    def generate(self, requests, num_samples, seed):
        self.calls += 1
        return [[Generation(t, len(t.split()), "stop") for t in self.texts[:num_samples]] for _ in requests]


@pytest.mark.parametrize("drop", [False, True])
def test_duplicates_are_counted_and_optionally_dropped(prompts, tmp_path, drop):
    backend = Scripted(["Answer: a", "Answer: b", "Answer: a", "Answer: a"])
    summary = sample_prompts(backend, prompts, tmp_path / "s.jsonl", fingerprint="f", num_samples=4,
                             drop_duplicates=drop)  # fmt: skip
    ids = set(by_id(tmp_path / "s.jsonl"))
    assert summary["duplicates"] == 2 * len(prompts)
    assert summary["duplicates_dropped"] == (2 * len(prompts) if drop else 0)
    kept = [0, 1] if drop else [0, 1, 2, 3]
    assert ids == {sample_id(p.prompt_id, k) for p in prompts for k in kept}  # ids stay stable
    assert summary["num_samples"] == len(ids)


def test_resume_with_dropped_duplicates_regenerates_only_the_torn_prompt(prompts, tmp_path):
    out = tmp_path / "s.jsonl"
    opts = dict(fingerprint="f", num_samples=3, chunk_size=1, drop_duplicates=True)
    sample_prompts(Scripted(["x", "x", "y"]), prompts[:3], out, **opts)
    lines = out.read_text().splitlines(keepends=True)
    out.rename(out.with_name(out.name + ".partial"))
    out.with_name(out.name + ".key").write_text("f")
    out.with_name(out.name + ".partial").write_text("".join(lines[:-1]))  # the last prompt lost one sample

    again = Scripted(["x", "x", "y"])
    summary = sample_prompts(again, prompts[:3], out, **opts)
    assert again.calls == 1 and summary["resumed_prompts"] == 2
    assert out.read_text().splitlines(keepends=True) == lines and summary["duplicates_dropped"] == 3


def test_a_server_echoing_the_key_in_its_error_leaks_it_nowhere(prompts, tmp_path, capsys, monkeypatch):
    """A 401 stops sampling at once (a bad key fails every request); its message, its traceback
    (`--debug` shows it), the output and the files never hold the key, though the server echoed it."""
    import traceback

    from alignkit.errors import SetupError

    monkeypatch.setenv(KEY_ENV, "sk-canary-7d1e0b")
    with ChatServer() as server:
        server.inject("unauthorized_echo")
        with pytest.raises(SetupError, match=r"HTTP 401 .*Bearer \*\*\*") as raised:
            sample(server, prompts[:2], tmp_path / "s.jsonl")
    shown = "".join(traceback.format_exception(raised.value))
    out = capsys.readouterr()
    assert "sk-canary-7d1e0b" not in shown + out.out + out.err
    assert not any(b"sk-canary-7d1e0b" in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


@pytest.mark.parametrize("fault", ENVELOPE_FAULTS)
def test_a_broken_reply_envelope_fails_only_its_prompt_never_a_crash(prompts, tmp_path, fault):
    with ChatServer() as server:
        server.inject(fault, when=f"[{prompts[0].prompt_id}]")  # once: asked again, then fine
        server.inject(*[fault] * 3, when=f"[{prompts[1].prompt_id}]")  # every attempt (max_retries=2)
        summary = sample(server, prompts[:3], tmp_path / "s.jsonl")
    done = {s.prompt_id for s in read_records(tmp_path / "s.jsonl", Sample)}
    if fault in ("null_usage", "content_parts"):  # usable as they are
        assert summary["failed"] == [] and done == {p.prompt_id for p in prompts[:3]}
    else:
        assert [f["prompt_id"] for f in summary["failed"]] == [prompts[1].prompt_id]
        assert "bad_reply" in summary["failed"][0]["error"]
        assert done == {prompts[0].prompt_id, prompts[2].prompt_id}  # the others' paid answers are kept


def test_a_failing_prompt_costs_no_other_prompt_its_paid_answers(prompts, tmp_path):
    """Answers are written as each prompt's reply arrives: a prompt that fails (here the server keeps
    answering 500, and the stage stops) loses none of its chunk-mates' answers, and the re-run asks
    for the failed prompt only."""
    from alignkit.errors import SetupError

    with ChatServer() as server:
        server.inject(*["server_error"] * 3, when=f"[{prompts[1].prompt_id}]")  # 1 + max_retries attempts
        with pytest.raises(SetupError, match="HTTP 500"):
            sample(server, prompts[:2], tmp_path / "s.jsonl")  # chunk_size 2: one chunk
        partial = (tmp_path / "s.jsonl.partial").read_text().splitlines()
        assert {json.loads(line)["prompt_id"] for line in partial} == {prompts[0].prompt_id}
        before = len(server.chat_requests)
        sample(server, prompts[:2], tmp_path / "s.jsonl")
        asked = server.chat_requests[before:]
    assert asked and all(f"[{prompts[1].prompt_id}]" in r.text() for r in asked)
    with ChatServer() as server:  # the file equals an uninterrupted run's
        sample(server, prompts[:2], tmp_path / "straight.jsonl")
    assert (tmp_path / "s.jsonl").read_text() == (tmp_path / "straight.jsonl").read_text()


@pytest.mark.parametrize("fault", FAULTS)
def test_the_key_leaks_under_no_fault(prompts, tmp_path, capsys, monkeypatch, fault):
    """Under each fixture fault the sampler's API key reaches no file, no output and no error message."""
    import traceback

    from alignkit.errors import AlignkitError

    monkeypatch.setenv(KEY_ENV, "sk-canary-0c9d2e")
    shown = ""
    with ChatServer(hang_s=0.2, trickle_s=0.01) as server:
        server.inject(fault, fault, fault, when=f"[{prompts[0].prompt_id}]")
        try:
            sample(server, prompts[:2], tmp_path / "s.jsonl")
        except AlignkitError as e:
            shown = "".join(traceback.format_exception(e))
    out = capsys.readouterr()
    assert "sk-canary-0c9d2e" not in shown + out.out + out.err
    assert not any(b"sk-canary-0c9d2e" in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
