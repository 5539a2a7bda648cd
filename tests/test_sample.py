import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from alignkit.records import Sample, load_image, read_records, sample_id
from alignkit.sample import RejectedPrompts, Request, SampleConfig, make_backend, run_sample, sample_prompts, to_request
from alignkit.sample.base import derive_seed
from alignkit.sample.templates import load_template, parse_output
from alignkit.worlds.shapes import make_shapes_prompts

K = 3
# A KV cache of a fixed size (GiB), not a share of the machine's memory: a share fails to start where
# other processes hold memory (and where another engine lives in this process).
VLLM_OPTIONS = {"max_model_len": 512, "distributed_executor_backend": "uni", "kv_cache_memory": 0.25}

# ---------------------------------------------------------------------------------------------
# templates


def test_answer_line_style():
    assert parse_output("answer_line", "I see a red square.\nSo one shape.\nAnswer: 1") == (
        "I see a red square.\nSo one shape.", "1", True,
    )  # fmt: skip
    assert parse_output("answer_line", "Final answer: yes\n")[1:] == ("yes", True)
    # the last marker wins; text after the answer line is not part of the answer
    assert parse_output("answer_line", "answer: no\nhmm\nAnswer: yes\nbye")[1] == "yes"
    assert parse_output("answer_line", "thinking\nAnswer:") == ("thinking", "", False)


def test_think_style():
    assert parse_output("think_tags", "<think>two shapes</think>\n2") == ("two shapes", "2", True)
    assert parse_output("think_tags", "two shapes</think> 2") == ("two shapes", "2", True)
    assert parse_output("think_tags", "<think>never closed\n2") == ("<think>never closed", "2", False)


def test_plain_and_malformed_outputs():
    assert parse_output("plain", "  red \n") == ("", "red", True)
    assert parse_output("answer_line", "I think\n\nred\n\n") == ("I think", "red", False)
    for style in ("answer_line", "think_tags", "plain"):
        assert parse_output(style, "") == ("", "", False)
        assert parse_output(style, " \n ") == ("", "", False)
    with pytest.raises(ValueError, match="unknown template style"):
        parse_output("xml", "x")


def test_template_files(tmp_path: Path):
    assert "Answer: <answer>" in load_template("cot").render("How many?")
    assert load_template("plain").render("How many?") == "How many?"
    f = tmp_path / "terse.yaml"
    f.write_text("instruction: Reply in one word.\nstyle: plain\n")
    t = load_template(str(f))
    assert (t.name, t.style, t.render("Q?")) == ("terse", "plain", "Q?\nReply in one word.")
    f.write_text("instruction: x\nstyle: bullets\n")
    with pytest.raises(ValueError, match="terse.yaml.*bullets"):
        load_template(str(f))
    with pytest.raises(ValueError, match="unknown template 'nope'"):
        load_template("nope")


# ---------------------------------------------------------------------------------------------
# transformers backend


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return make_shapes_prompts(tmp_path_factory.mktemp("shapes"), 6, seed=0)


@pytest.fixture(scope="module")
def hf_backend(tiny_qwen_dir):
    return make_backend("transformers", str(tiny_qwen_dir), max_new_tokens=12, batch_size=4)


def _by_id(path: Path) -> dict[str, Sample]:
    records = read_records(path, Sample)
    ids = [r.sample_id for r in records]
    assert len(ids) == len(set(ids)), "duplicate sample ids"
    return {r.sample_id: r for r in records}


def _check_join(samples: dict[str, Sample], prompts, k: int = K):
    assert set(samples) == {sample_id(p.prompt_id, i) for p in prompts for i in range(k)}
    for s in samples.values():
        assert s.finish_reason in ("stop", "length") and 0 < s.num_tokens <= 12


def test_run_sample_transformers(tiny_qwen_dir, prompts, tmp_path: Path):
    cfg = SampleConfig(backend="transformers", num_samples=K, max_new_tokens=12, chunk_size=4, batch_size=4)
    summary = run_sample(prompts, tmp_path / "s.jsonl", cfg, fingerprint="f", model=str(tiny_qwen_dir))
    samples = _by_id(tmp_path / "s.jsonl")
    _check_join(samples, prompts)
    assert summary["num_prompts"] == 6 and summary["num_samples"] == 6 * K and summary["failed"] == []
    assert summary["truncated"] == sum(s.finish_reason == "length" for s in samples.values())
    assert summary["unparsed"] == sum(not s.answer_parsed for s in samples.values())
    assert all(s.policy == str(tiny_qwen_dir) for s in samples.values())
    assert not (tmp_path / "s.jsonl.partial").exists()


def test_same_seed_reproduces(hf_backend, prompts, tmp_path: Path):
    texts = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        sample_prompts(hf_backend, prompts, tmp_path / name, fingerprint="f", num_samples=K, seed=seed)
        texts[name] = {i: s.text for i, s in _by_id(tmp_path / name).items()}
    assert texts["a"] == texts["b"]
    assert texts["a"] != texts["c"]


class Killed(Exception):
    pass


class DiesAfter:
    """Wraps a backend and raises on the n-th call, like a killed run."""

    def __init__(self, backend, calls: int):
        self.backend, self.calls, self.policy = backend, calls, backend.policy
        self.seeds_per_prompt = backend.seeds_per_prompt

    def generate(self, requests, num_samples, seed):
        self.calls -= 1
        if self.calls < 0:
            raise Killed
        return self.backend.generate(requests, num_samples, seed)


def test_resume_after_kill_matches_uninterrupted_run(hf_backend, prompts, tmp_path: Path):
    opts = dict(fingerprint="f", num_samples=K, seed=5, chunk_size=4)
    full = tmp_path / "full.jsonl"
    sample_prompts(hf_backend, prompts, full, **opts)

    out = tmp_path / "resumed.jsonl"
    with pytest.raises(Killed):
        sample_prompts(DiesAfter(hf_backend, 1), prompts, out, **opts)
    partial = out.with_name(out.name + ".partial")
    lines = partial.read_text().splitlines(keepends=True)
    assert len(lines) == 4 * K  # the first chunk
    # Lose the last prompt's samples but one, and tear the last line, as a kill mid-write would.
    partial.write_text("".join(lines[: 3 * K + 1]) + lines[3 * K + 1][:20])

    summary = sample_prompts(hf_backend, prompts, out, **opts)
    assert summary["resumed_prompts"] == 3 and summary["num_samples"] == 6 * K
    resumed, expected = _by_id(out), _by_id(full)
    assert {i: s.text for i, s in resumed.items()} == {i: s.text for i, s in expected.items()}


def test_resume_asks_a_seed_per_prompt_backend_for_the_missing_prompts_only(prompts, tmp_path: Path, monkeypatch):
    """A server backend (a seed per prompt) is not asked again, or billed, for prompts already on disk."""
    from alignkit.testing.chat_server import ChatServer

    monkeypatch.setenv("ALIGNKIT_TEST_KEY", "sk-test")
    opts = dict(fingerprint="f", num_samples=K, seed=5, chunk_size=4)
    with ChatServer() as server:
        options = {"base_url": server.url, "api_key_env": "ALIGNKIT_TEST_KEY"}
        backend = make_backend("openai", "policy", openai_options=options)
        sample_prompts(backend, prompts, tmp_path / "full.jsonl", **opts)
        out = tmp_path / "resumed.jsonl"
        with pytest.raises(Killed):
            sample_prompts(DiesAfter(backend, 1), prompts, out, **opts)
        partial = out.with_name(out.name + ".partial")
        lines = partial.read_text().splitlines(keepends=True)
        partial.write_text("".join(lines[: 2 * K + 1]))  # prompts 0 and 1, and one sample of prompt 2
        before = len(server.chat_requests)
        summary = sample_prompts(backend, prompts, out, **opts)
        asked = [r.body["seed"] for r in server.chat_requests[before:]]
    assert summary["resumed_prompts"] == 2 and summary["num_samples"] == 6 * K
    chunk_seeds = [derive_seed(5, "chunk", c) for c in (0, 1)]
    assert sorted(asked) == sorted(derive_seed(chunk_seeds[i // 4], p.prompt_id) for i, p in enumerate(prompts[2:], 2))
    resumed, expected = _by_id(out), _by_id(tmp_path / "full.jsonl")
    assert {i: s.text for i, s in resumed.items()} == {i: s.text for i, s in expected.items()}


def test_bad_image_is_reported_not_fatal(hf_backend, prompts, tmp_path: Path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = [prompts[0], dataclasses.replace(prompts[1], images=[str(broken)]), prompts[2]]
    summary = sample_prompts(hf_backend, bad, tmp_path / "s.jsonl", fingerprint="f", num_samples=K)
    assert [f["prompt_id"] for f in summary["failed"]] == [prompts[1].prompt_id]
    assert prompts[1].prompt_id in summary["failed"][0]["error"] and "broken.png" in summary["failed"][0]["error"]
    _check_join(_by_id(tmp_path / "s.jsonl"), [prompts[0], prompts[2]])


def test_too_large_image_is_reported_not_fatal(hf_backend, prompts, tmp_path: Path, monkeypatch):
    """An image over PIL's decompression-bomb limit (lowered here: shapes images are small) is a
    listed failure naming the prompt and the image; the other prompts are sampled."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # PIL refuses images over twice this
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(big)
    width, height = Image.open(prompts[0].images[0]).size
    assert width * height < 20_000  # the shapes images stay under it
    bad = [prompts[0], dataclasses.replace(prompts[1], images=[str(big)])]
    summary = sample_prompts(hf_backend, bad, tmp_path / "s.jsonl", fingerprint="f", num_samples=K)
    [failure] = summary["failed"]
    assert failure["prompt_id"] == prompts[1].prompt_id and "big.png" in failure["error"]
    assert "exceeds limit" in failure["error"]
    _check_join(_by_id(tmp_path / "s.jsonl"), [prompts[0]])


def test_truncation_flag_transformers(hf_backend):
    eos = next(iter(hf_backend.eos_ids))
    stopped = hf_backend._generation([5, 6, eos, eos])  # after eos comes padding
    assert (stopped.finish_reason, stopped.num_tokens) == ("stop", 3)
    truncated = hf_backend._generation([5] * 12)  # max_new_tokens without eos
    assert (truncated.finish_reason, truncated.num_tokens) == ("length", 12)


def test_truncation_flag_vllm():
    from types import SimpleNamespace

    from alignkit.sample.vllm_backend import _generation

    for reason, flag in [("length", "length"), ("stop", "stop"), ("abort", "stop")]:
        assert _generation(SimpleNamespace(token_ids=[1, 2], finish_reason=reason), "t").finish_reason == flag


def _random_adapter(model_dir: Path, out: Path, **lora: Any) -> Path:
    """A LoRA adapter with random (non-zero) weights, so sampling through it visibly differs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    get_peft_model(model, LoraConfig(lora_alpha=64, init_lora_weights=False, **lora)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lora_dir(tiny_qwen_dir, tmp_path_factory) -> Path:
    return _random_adapter(tiny_qwen_dir, tmp_path_factory.mktemp("lora") / "adapter", r=4,
                           target_modules=["q_proj", "v_proj"])  # fmt: skip


@pytest.fixture(scope="module")
def vision_lora_dir(tiny_qwen_dir, tmp_path_factory) -> Path:
    """An adapter on the vision tower's attention as well as the language model's (not vLLM-able)."""
    return _random_adapter(tiny_qwen_dir, tmp_path_factory.mktemp("lora") / "vision", r=4,
                           target_modules=r".*(visual\.blocks\.\d+\.attn\.qkv|language_model.*\.q_proj)")  # fmt: skip


def test_lora_problem_names_what_vllm_cannot_apply(tiny_qwen_dir, lora_dir, vision_lora_dir, tmp_path: Path):
    from alignkit.sample.vllm_backend import _max_lora_rank, lora_problem

    assert [_max_lora_rank(r) for r in (1, 4, 8, 12, 64, 300, 512, 513)] == [8, 8, 8, 16, 64, 320, 512, None]
    assert lora_problem(str(lora_dir)) is None
    problem = lora_problem(str(vision_lora_dir))
    assert "outside the language model, e.g. base_model.model.model.visual.blocks.0.attn.qkv" in problem
    dora = _random_adapter(tiny_qwen_dir, tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True)
    assert "DoRA" in lora_problem(str(dora))
    saved = _random_adapter(tiny_qwen_dir, tmp_path / "saved", r=4, target_modules=["q_proj"],
                            modules_to_save=["lm_head"])  # fmt: skip
    assert "modules_to_save" in lora_problem(str(saved))
    wide = _random_adapter(tiny_qwen_dir, tmp_path / "wide", r=1024, target_modules=["q_proj"])
    assert "rank 1024 is above the largest vLLM supports" in lora_problem(str(wide))


def test_transformers_samples_from_adapter(tiny_qwen_dir, lora_dir, hf_backend, prompts, tmp_path: Path):
    lora = make_backend("transformers", str(tiny_qwen_dir), str(lora_dir), max_new_tokens=12, batch_size=4)
    opts = dict(fingerprint="f", num_samples=K, seed=0)
    sample_prompts(lora, prompts[:2], tmp_path / "lora.jsonl", **opts)
    sample_prompts(hf_backend, prompts[:2], tmp_path / "base.jsonl", **opts)
    tuned, base = _by_id(tmp_path / "lora.jsonl"), _by_id(tmp_path / "base.jsonl")
    assert {s.policy for s in tuned.values()} == {f"{tiny_qwen_dir}+{lora_dir}"}
    assert {i: s.text for i, s in tuned.items()} != {i: s.text for i, s in base.items()}


def test_unknown_backend(prompts, tmp_path: Path):
    with pytest.raises(ValueError, match="unknown sampling backend 'tgi'"):
        make_backend("tgi", "x")


# ---------------------------------------------------------------------------------------------
# vLLM backend (a real engine, started once for the module)


@pytest.fixture(scope="module")
def vllm_backend(tiny_qwen_dir):
    # In-process engine: on 2 CPU cores each spawned vLLM process costs ~40 s of imports.
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield make_backend("vllm", str(tiny_qwen_dir), max_new_tokens=12, vllm_options=VLLM_OPTIONS)
    finally:
        if saved is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved


def test_kv_cache_memory_is_an_absolute_size():
    from alignkit.sample.vllm_backend import _engine_options

    opts = _engine_options({"kv_cache_memory": 0.25, "max_model_len": 512})
    assert opts["kv_cache_memory_bytes"] == 2**28 and "kv_cache_memory" not in opts and opts["max_model_len"] == 512
    assert "kv_cache_memory_bytes" not in _engine_options({})


@pytest.mark.slow
def test_vllm_samples_join_and_reproduce(vllm_backend, prompts, tmp_path: Path):
    runs = {}
    for name, seed, subset in [("a", 0, prompts), ("b", 0, prompts[::-1][:4]), ("c", 1, prompts)]:
        summary = sample_prompts(vllm_backend, subset, tmp_path / name, fingerprint="f", num_samples=K, seed=seed)
        assert summary["num_samples"] == len(subset) * K and summary["failed"] == []
        runs[name] = {i: s.text for i, s in _by_id(tmp_path / name).items()}
    _check_join(_by_id(tmp_path / "a"), prompts)
    # A prompt's samples depend on its id and the seed only, not on the batch it came in.
    assert all(runs["a"][i] == t for i, t in runs["b"].items())
    assert runs["a"] != runs["c"]
    assert len(set(runs["a"].values())) > len(prompts)  # the K samples of a prompt differ


@pytest.mark.slow
def test_vllm_prompt_over_the_context_is_listed_and_the_others_sampled(vllm_backend, prompts, tmp_path: Path):
    """vLLM refuses a whole batch for one prompt longer than max_model_len: that prompt is listed,
    the others get exactly the answers they get without it (a seed per prompt)."""
    long = dataclasses.replace(prompts[1], question=" ".join(["Describe the shapes again."] * 200))
    opts = dict(fingerprint="f", num_samples=K, seed=4)
    summary = sample_prompts(vllm_backend, [prompts[0], long, prompts[2]], tmp_path / "s.jsonl", **opts)
    assert [f["prompt_id"] for f in summary["failed"]] == [long.prompt_id]
    assert "maximum context length is 512 tokens" in summary["failed"][0]["error"]
    got = _by_id(tmp_path / "s.jsonl")
    sample_prompts(vllm_backend, [prompts[0], prompts[2]], tmp_path / "ok.jsonl", **opts)
    assert {i: s.text for i, s in got.items()} == {i: s.text for i, s in _by_id(tmp_path / "ok.jsonl").items()}


@pytest.mark.slow
def test_vllm_texts_match_vllm_detokenizer(vllm_backend, prompts):
    """The backend turns vLLM's detokenizer off and decodes once at the end: same texts as vLLM's own,
    except that vLLM's incremental detokenizer leaves out an incomplete UTF-8 character at the end of
    a truncated answer, where a whole decode writes U+FFFD (as the transformers backend does)."""
    from vllm import SamplingParams

    requests = [to_request(p, load_template("cot")) for p in prompts[:3]]
    ours = vllm_backend.generate(requests, K, seed=5)
    processor = vllm_backend.processor
    inputs = [{"prompt": processor.apply_chat_template(r.messages, add_generation_prompt=True),
               "multi_modal_data": {"image": r.images[0]}} for r in requests]  # fmt: skip
    params = [SamplingParams(n=K, seed=derive_seed(5, r.prompt_id), max_tokens=12) for r in requests]
    theirs = vllm_backend.llm.generate(inputs, params, use_tqdm=False)
    assert [[g.token_ids for g in gs] for gs in ours] == [[list(c.token_ids) for c in o.outputs] for o in theirs]
    texts = [[g.text.rstrip("\ufffd") for g in gs] for gs in ours]
    assert texts == [[c.text.rstrip("\ufffd") for c in o.outputs] for o in theirs]


@pytest.mark.slow
def test_vllm_data_parallel_matches_one_engine(vllm_backend, tiny_qwen_dir, prompts):
    """Two engines in two processes return, in order, exactly the samples one engine draws.

    Runs before the LoRA test: an in-process engine freed there tears down vLLM's process-wide
    parallel state, which the module's engine needs."""
    options = VLLM_OPTIONS | {"data_parallel_size": 2}
    backend = make_backend("vllm", str(tiny_qwen_dir), max_new_tokens=12, vllm_options=options)
    requests = [to_request(p, load_template("cot")) for p in prompts[:5]]
    got = backend.generate(requests, K, seed=3)
    assert [len(gs) for gs in got] == [K] * 5
    one_engine = vllm_backend.generate(requests, K, seed=3)
    assert [[g.text for g in gs] for gs in got] == [[g.text for g in gs] for gs in one_engine]
    # A prompt one worker's engine refuses comes back with the answers to all the others.
    long = to_request(dataclasses.replace(prompts[5], question="Describe it. " * 400), load_template("cot"))
    with pytest.raises(RejectedPrompts) as refused:
        backend.generate(requests[:4] + [long], K, seed=3)  # shards: 3 prompts, then 1 + the long one
    assert list(refused.value.errors) == [long.prompt_id]
    assert [[g.text for g in gs] for gs in refused.value.generations] == [[g.text for g in gs] for gs in one_engine[:4]]


@pytest.mark.slow
def test_vllm_samples_from_lora_adapter(tiny_qwen_dir, lora_dir, prompts, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    backend = make_backend("vllm", str(tiny_qwen_dir), str(lora_dir), max_new_tokens=12, vllm_options=VLLM_OPTIONS)
    assert backend.lora is not None and backend.policy == f"{tiny_qwen_dir}+{lora_dir}"
    requests = [Request(p.prompt_id, load_template("cot").messages(p.question, 1), [load_image(p.images[0])])
                for p in prompts[:2]]  # fmt: skip
    tuned = backend.generate(requests, K, seed=0)
    backend.lora = None  # the same engine and seed without the adapter
    assert [[g.text for g in gs] for gs in tuned] != [[g.text for g in gs] for gs in backend.generate(requests, K, 0)]


def test_data_parallel_ranks_get_disjoint_devices():
    from alignkit.sample.vllm_backend import _rank_env

    visible = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert [_rank_env(r, 2, 2, visible, None) for r in (0, 1)] == [
        {"CUDA_VISIBLE_DEVICES": "4,5"}, {"CUDA_VISIBLE_DEVICES": "6,7"}]  # fmt: skip
    assert _rank_env(2, 3, 1, {}, None) == {"CUDA_VISIBLE_DEVICES": "2"}
    with pytest.raises(ValueError, match="needs that many GPUs; visible: 0,1"):
        _rank_env(0, 2, 2, {"CUDA_VISIBLE_DEVICES": "0,1"}, None)
    cpus = list(range(8))
    assert [_rank_env(r, 2, 2, {}, cpus) for r in (0, 1)] == [
        {"VLLM_CPU_OMP_THREADS_BIND": "0,1|2,3"}, {"VLLM_CPU_OMP_THREADS_BIND": "4,5|6,7"}]  # fmt: skip



@pytest.mark.slow
def test_vllm_samples_unloraable_adapter_from_merged_copy(tiny_qwen_dir, vision_lora_dir, prompts, monkeypatch):
    """An adapter vLLM cannot apply as LoRA (here: on the vision tower) is merged into a temporary copy."""
    from alignkit.models import merge_adapter

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with pytest.warns(UserWarning, match="outside the language model.*merged temporary copy"):
        backend = make_backend("vllm", str(tiny_qwen_dir), str(vision_lora_dir), max_new_tokens=12,
                               vllm_options=VLLM_OPTIONS)  # fmt: skip
    assert backend.lora is None and backend.policy == f"{tiny_qwen_dir}+{vision_lora_dir}"
    engine_dir = Path(backend.llm.llm_engine.model_config.model)
    assert engine_dir.is_relative_to(backend._merged.name)
    # The engine's weights are the adapter merged into the base, the vision tower's included.
    from safetensors.torch import load_file

    reference = merge_adapter(str(tiny_qwen_dir), str(vision_lora_dir), engine_dir.parent / "reference")
    ours, theirs = load_file(engine_dir / "model.safetensors"), load_file(reference / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    base = load_file(tiny_qwen_dir / "model.safetensors")
    qkv = next(k for k in base if "visual.blocks.0.attn.qkv.weight" in k)
    assert not base[qkv].equal(ours[qkv])
    requests = [to_request(p, load_template("cot")) for p in prompts[:2]]
    assert all(len(gs) == K for gs in backend.generate(requests, K, seed=0))


@pytest.mark.slow
def test_vllm_starts_with_little_free_memory(tiny_qwen_dir, monkeypatch):
    """With kv_cache_memory the engine starts wherever that much memory is free, even when other
    processes hold all but 1 GiB of a large machine (a share of host RAM failed to start there).
    Last in the module: engines started after others in one process may disturb those."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("vLLM's CPU worker reads the host's free memory")
    import vllm.v1.worker.cpu_worker as cpu_worker
    from vllm.utils.cpu_resource_utils import MemoryNodeInfo

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process sees the patch
    little = MemoryNodeInfo(total_memory=256 * 2**30, available_memory=2**30)
    monkeypatch.setattr(cpu_worker, "get_memory_node_info", lambda node=0: little)
    with pytest.raises(RuntimeError, match="less than desired CPU memory utilization"):
        make_backend("vllm", str(tiny_qwen_dir), vllm_options=VLLM_OPTIONS | {"kv_cache_memory": None})
    backend = make_backend("vllm", str(tiny_qwen_dir), max_new_tokens=4, vllm_options=VLLM_OPTIONS)
    assert backend.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == 2**28
