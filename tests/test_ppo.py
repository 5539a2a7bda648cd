"""PPO: its formulas against hand computation, its rewards, and short runs on the tiny Qwen2-VL."""

import base64
import gc
import io
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from alignkit.judge.config import JudgeConfig
from alignkit.records import Prompt, Sample
from alignkit.sample.config import SampleConfig
from alignkit.train.config import PpoConfig, TrainConfig
from alignkit.train.ppo import (
    AdaptiveKL,
    RunningMeanStd,
    evaluate,
    gae,
    kl_penalised_rewards,
    policy_loss,
    step_prompts,
    value_loss,
)  # fmt: skip
from alignkit.train.rewards import RewardFn, combine, function_reward, judge_reward, reward_model_reward


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second answer ends after 2 tokens
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: δ2 = 1 − .7 = .3; δ1 = .9·.7 − .6 = .03; δ0 = .9·.6 − .5 = .04; A_t = δ_t + .72·A_{t+1}
    a1 = 0.03 + 0.72 * 0.3
    assert adv[0].tolist() == pytest.approx([0.04 + 0.72 * a1, a1, 0.3])
    # row 1: V = 0 after the end, so δ1 = 2 − 1 = 1, δ0 = .9·1 − 1 = −.1; padding gets nothing
    assert adv[1].tolist() == pytest.approx([-0.1 + 0.72, 1.0, 0.0])
    assert ret.flatten().tolist() == pytest.approx([0.04 + 0.72 * a1 + 0.5, a1 + 0.6, 1.0, 1.62, 2.0, 0.0])


def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 3)
    ratio = torch.tensor([[1.5, 0.5, 1.1]])
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = policy_loss(ratio.log(), old, adv, torch.ones(1, 3), clip_range=0.2)
    # per token max(−A·r, −A·clip(r)): max(−1.5, −1.2), max(−.5, −.8), max(1.1, 1.1)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert stats["clipfrac"] == pytest.approx(2 / 3)
    assert stats["approx_kl"] == pytest.approx(sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1)) / 3)
    masked, _ = policy_loss(ratio.log(), old, adv, torch.tensor([[1.0, 1.0, 0.0]]), clip_range=0.2)
    assert masked.item() == pytest.approx((-1.2 - 0.5) / 2)


def test_value_clip_by_hand():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]])
    loss = value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.2)
    # token 0: clipped V = .7, max((1−2)², (.7−2)²) = 1.69; token 1: clipped .3, max(0, .09) = .09
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09) / 2)


def test_per_token_kl_penalty_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards, kl = kl_penalised_rewards(logp, ref, torch.tensor([2.0]), mask, kl_coef=0.1)
    assert kl.tolist() == [[0.5, 0.0, 0.0]]
    assert rewards[0].tolist() == pytest.approx([-0.05, 2.0, 0.0])  # the score lands on the last real token


def test_reward_normalisation_by_hand():
    stats = RunningMeanStd()
    stats.update(torch.tensor([1.0, 2.0, 3.0]))
    stats.update(torch.tensor([4.0, 5.0]))
    assert (stats.mean, stats.var) == pytest.approx((3.0, 2.0), rel=1e-3)  # of 1..5 (population variance)
    assert stats.normalize(torch.tensor([6.0]), clip=10).item() == pytest.approx(3 / math.sqrt(2), rel=1e-3)
    assert stats.normalize(torch.tensor([6.0, -6.0]), clip=1).tolist() == [1.0, -1.0]


def test_adaptive_kl_by_hand():
    ctl = AdaptiveKL(0.1, target=6.0, horizon=100)
    ctl.update(kl=12.0, n=10)  # error clip(12/6 − 1, ±.2) = .2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    fixed = AdaptiveKL(0.1, target=None, horizon=100)
    fixed.update(kl=12.0, n=10)
    assert fixed.value == 0.1


def test_step_prompts_cover_every_prompt_once_per_pass():
    first_pass = [i for step in range(5) for i in step_prompts(10, 2, step, seed=0)]
    assert sorted(first_pass) == list(range(10))
    assert step_prompts(10, 2, 7, seed=0) == step_prompts(10, 2, 7, seed=0)


# ---------------------------------------------------------------------------------------------
# rewards


def _prompt_and_samples() -> tuple[list[Prompt], list[Sample]]:
    prompt = Prompt("p", "Describe the image.", [], "describe", None, ["red square"])
    texts = ["There is a red square.", "There is a red square and a blue circle."]
    return [prompt, prompt], [Sample(f"p#s{i}", "p", t, "", t, True, 5, "stop") for i, t in enumerate(texts)]


def test_reference_judge_reward_and_weighted_sum(tmp_path):
    prompts, samples = _prompt_and_samples()
    reference = judge_reward(JudgeConfig(rubric="overall", backend="reference"), tmp_path / "c.sqlite")
    scores = reference(prompts, samples)
    assert scores[0] > scores[1]  # the second answer hallucinates a blue circle
    length = RewardFn("len", lambda ps, ss: [len(s.text) for s in ss])
    both = combine([(2.0, reference), (0.5, length)])
    assert both(prompts, samples) == pytest.approx([2 * s + 0.5 * len(x.text) for s, x in zip(scores, samples)])


def test_function_reward_from_a_file(tmp_path):
    (tmp_path / "my_reward.py").write_text("def blue(prompt, sample):\n    return float('blue' in sample.text)\n")
    prompts, samples = _prompt_and_samples()
    assert function_reward(f"{tmp_path / 'my_reward.py'}:blue")(prompts, samples) == [0.0, 1.0]
    with pytest.raises(ValueError, match="no function 'nope'"):
        function_reward(f"{tmp_path / 'my_reward.py'}:nope")


def test_failed_scores_count_and_score_zero():
    prompts, samples = _prompt_and_samples()
    flaky = RewardFn("flaky", lambda ps, ss: [None, 1.0])
    assert flaky(prompts, samples) == [0.0, 1.0] and flaky.failures == 1


# ---------------------------------------------------------------------------------------------
# runs on the tiny random-weight Qwen2-VL


def _says_red(prompts: list[Prompt], samples: list[Sample]) -> list[float]:
    """+1 when the answer says "red": a word the random policy samples about 1 time in 10."""
    return [float("red" in s.text) for s in samples]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from alignkit.worlds.shapes import make_shapes_prompts

    return make_shapes_prompts(tmp_path_factory.mktemp("ppo"), 8, seed=0)


def _length(prompts: list[Prompt], samples: list[Sample]) -> list[float]:
    """The answer's length in characters: a dense reward, so the very first step moves the policy."""
    return [float(len(s.text)) for s in samples]


def _run(tiny_qwen_dir, shapes, out_dir, steps: int, *, reward=None, finetune="lora", rollout="transformers",
         vllm_options=None, **overrides):  # fmt: skip
    """A short PPO run (`overrides` go to the ppo, sample or train section that has the key); returns the
    final adapter (or model) and the metrics."""
    from alignkit.train.ppo import train_ppo

    settings = dict(prompts_per_step=4, num_samples=4, max_new_tokens=12, learning_rate=1e-2, ppo_epochs=2,
                    num_minibatches=2) | overrides  # fmt: skip
    sections = {}
    for cls in (PpoConfig, SampleConfig, TrainConfig):
        sections[cls] = {k: settings.pop(k) for k in list(settings) if k in cls.model_fields}
    assert not settings, f"not a ppo, sample or train key: {settings}"
    ppo = PpoConfig(steps=steps, rollout=rollout, **sections[PpoConfig])
    vllm = dict(vllm_options or {})
    engine = {"distributed_executor_backend": vllm.pop("distributed_executor_backend")} if vllm else None
    sample = SampleConfig(template="plain", vllm=vllm, **sections[SampleConfig])
    train = TrainConfig(method="ppo", finetune=finetune, **sections[TrainConfig])
    final = train_ppo(shapes, out_dir, ppo, model=str(tiny_qwen_dir), reward=reward or RewardFn("red", _says_red),
                      sample=sample, train=train, engine_options=engine)  # fmt: skip
    return final, [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ppo_raises_a_programmatic_reward(tiny_qwen_dir, shapes, tmp_path):
    adapter, steps = _run(tiny_qwen_dir, shapes, tmp_path, steps=12, save_steps=100)
    first, last = [s["reward/raw"] for s in steps[:3]], [s["reward/raw"] for s in steps[-3:]]
    assert sum(last) / 3 > sum(first) / 3 + 0.3, (first, last)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "tokenizer_config.json").is_file()
    logged = {"reward/raw", "reward/scaled", "kl", "entropy", "policy_loss", "value_loss", "clipfrac",
              "approx_kl", "explained_variance", "response_length"}  # fmt: skip
    assert logged <= steps[-1].keys()


@pytest.mark.slow
def test_ppo_resumes_from_the_last_checkpoint(tiny_qwen_dir, shapes, tmp_path):
    _, full = _run(tiny_qwen_dir, shapes, tmp_path / "full", steps=3, save_steps=100)
    _run(tiny_qwen_dir, shapes, tmp_path / "cut", steps=2, save_steps=1)  # "killed" after step 2 ...
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors").is_file()
    _, resumed = _run(tiny_qwen_dir, shapes, tmp_path / "cut", steps=3, save_steps=1)  # ... resumes at 1
    assert [s["step"] for s in resumed] == [1, 2, 3]
    for a, b in zip(full, resumed):
        assert a["reward/raw"] == b["reward/raw"] and a["kl"] == pytest.approx(b["kl"], abs=1e-4)


@pytest.mark.slow
def test_runner_ppo_stage_writes_the_adapter_eval_uses(tiny_qwen_dir, tmp_path):
    from alignkit.recipe import Recipe
    from alignkit.runner import Runner

    recipe = Recipe.model_validate({
        "output_dir": str(tmp_path / "run"), "stages": ["prompts", "train"], "policy": {"model": str(tiny_qwen_dir)},
        "data": {"synthetic": {"num_prompts": 4}}, "sample": {"num_samples": 2, "max_new_tokens": 8, "template": "plain"},
        "train": {"method": "ppo", "learning_rate": 1e-3}, "ppo": {"steps": 2, "prompts_per_step": 2},
    })  # fmt: skip
    runner = Runner(recipe)
    summary = runner.run()["train"]
    assert summary["adapter"] == str(runner.paths.adapter)
    assert runner.trained(1) == (str(tiny_qwen_dir), str(runner.paths.adapter))
    assert len((runner.paths.train / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.fixture
def forwards(monkeypatch) -> list[SimpleNamespace]:
    """Every `evaluate` (forward pass) of the runs in a test: its models, their modes, the log-probs it gave."""
    from alignkit.train import ppo

    calls = []

    def recorded(model, value, batch, rows, pad_id, temperature):
        out = evaluate(model, value, batch, rows, pad_id, temperature)
        calls.append(SimpleNamespace(model=model, value=value, batch=batch, rows=rows, pad_id=pad_id, logp=out[0],
                                     modes=(model.training, value is not None and value.training)))  # fmt: skip
        return out

    monkeypatch.setattr(ppo, "evaluate", recorded)
    return calls


@pytest.mark.slow
def test_separate_value_model_trains_its_own_backbone_and_resumes(tiny_qwen_dir, shapes, tmp_path, forwards):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    run = dict(reward=RewardFn("length", _length), value_model="separate")
    _, full = _run(tiny_qwen_dir, shapes, tmp_path / "full", steps=3, save_steps=100, **run)
    _run(tiny_qwen_dir, shapes, tmp_path / "cut", steps=2, save_steps=1, **run)  # "killed" after step 2
    checkpoint = tmp_path / "cut" / "checkpoints" / "checkpoint-1"
    critic = {k.removeprefix("value."): v for k, v in load_file(checkpoint / "weights.safetensors").items()
              if k.startswith("value.")}  # fmt: skip
    policy = load_file(checkpoint / "adapter_model.safetensors")
    # The critic is a LoRA backbone of its own plus the head, all moved off their zero init by one step;
    # its LoRA is not the policy's, and the policy's adapter holds no critic weights.
    assert critic["head.weight"].abs().sum() > 0
    critic_b = {k.removeprefix("backbone.").replace(".default", ""): v for k, v in critic.items() if "lora_B" in k}
    policy_b = {k: v for k, v in policy.items() if "lora_B" in k}
    assert critic_b.keys() == policy_b.keys() and len(policy_b) > 0
    assert all(v.abs().sum() > 0 and not torch.equal(v, policy_b[k]) for k, v in critic_b.items())
    assert all("lora_" in k for k in policy)
    # the critic is switched with the policy: no dropout in the rollout's values, training mode in updates
    assert {f.modes for f in forwards if f.value is not None} == {(False, False), (True, True)}

    adapter, resumed = _run(tiny_qwen_dir, shapes, tmp_path / "cut", steps=3, save_steps=1, **run)  # resumes at 1
    assert [s["step"] for s in resumed] == [1, 2, 3]
    for a, b in zip(full, resumed):  # value_loss reads the critic: it was restored with the policy
        assert a["reward/raw"] == b["reward/raw"] and a["kl"] == pytest.approx(b["kl"], abs=1e-4)
        assert a["value_loss"] == pytest.approx(b["value_loss"], rel=1e-3)
    loaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir), adapter)
    trained = {k: v for k, v in loaded.state_dict().items() if "lora_B" in k}
    assert len(trained) == len(policy_b) and all(v.abs().sum() > 0 for v in trained.values())


@pytest.mark.slow
def test_full_fine_tuning_keeps_the_reference_frozen_and_saves_a_full_model(tiny_qwen_dir, shapes, tmp_path, forwards):
    from transformers import AutoModelForImageTextToText

    final, steps = _run(tiny_qwen_dir, shapes, tmp_path, steps=2, save_steps=1, reward=RewardFn("length", _length),
                        finetune="full")  # fmt: skip
    base = AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    base_state = base.state_dict()

    # the reference: the one model forwarded without values, a frozen copy, still the initial weights
    references = {id(f.model): f.model for f in forwards if f.value is None}
    assert len(references) == 1 and not references.keys() & {id(f.model) for f in forwards if f.value is not None}
    (reference,) = references.values()
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(torch.equal(v, base_state[k]) for k, v in reference.state_dict().items())
    last = [f for f in forwards if f.value is None][-1]  # step 2's reference log-probs: the untrained model's
    with torch.no_grad():
        assert torch.allclose(last.logp, evaluate(base, None, last.batch, last.rows, last.pad_id, 1.0)[0], atol=1e-5)
    # ... while the policy moved: no KL at the first rollout, some at the second
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6) and steps[1]["kl"] > 0.01

    # checkpoint and final output are full models (no adapter) that load, with trained weights
    assert final == tmp_path / "model" and (final / "tokenizer_config.json").is_file()
    for path in (tmp_path / "checkpoints" / "checkpoint-1", final):
        assert not (path / "adapter_config.json").exists()
        state = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).state_dict()
        assert state.keys() == base_state.keys()
        assert any(not torch.equal(v, base_state[k]) for k, v in state.items())


# ---------------------------------------------------------------------------------------------
# online rewards from an OpenAI-compatible judge (the chat_server fixture) and the critique RM

JUDGE_KEY_ENV = "ALIGNKIT_TEST_JUDGE_KEY"


def _grades(answer: str) -> dict[str, int]:
    """The test judge's grades of an answer: arbitrary, but a function of its text."""
    return {"hallucination": len(answer) % 11, "correctness": len(answer.split()) % 11}


def _answer(request) -> str:
    """The answer a judge request asks about: the last <answer> block of the `overall` judge's prompt."""
    return request.text().rsplit("<answer>", 1)[1].split("</answer>", 1)[0].strip()


def _judge_reply(body: dict) -> dict:
    from alignkit.testing.chat_server import RecordedRequest

    return {"rationale": "test verdict", **_grades(_answer(RecordedRequest("POST", "", {}, body)))}


def _judge_score(text: str) -> float:
    """The `overall` judge's score of `_judge_reply`'s verdict on `text` (as shown to the judge, tags defused):
    0.6·(1 − hallucination/10) + 0.4·correctness/10."""
    from alignkit.judge.rubric import neutralise

    g = _grades(neutralise(text).strip())
    return 0.6 * (1 - g["hallucination"] / 10) + 0.4 * g["correctness"] / 10


@pytest.fixture
def judge_server(monkeypatch):
    from alignkit.testing.chat_server import ChatServer

    monkeypatch.setenv(JUDGE_KEY_ENV, "test")
    with ChatServer(_judge_reply) as server:
        yield server


def _openai_judge(server, cache_path) -> RewardFn:
    return judge_reward(JudgeConfig(rubric="overall", backend="openai", model=server.model, base_url=server.url,
                                    api_key_env=JUDGE_KEY_ENV, concurrency=4, timeout=30.0, max_retries=1,
                                    image_max_side=512), cache_path)  # fmt: skip


def test_openai_judge_reward_sends_images_scores_each_sample_and_caches(judge_server, shapes, tmp_path):
    from alignkit.records import load_image

    # A prompt drawn twice in one batch, as a PPO step can: two samples with one sample id, different texts.
    prompts = [shapes[0], shapes[1], shapes[0]]
    texts = ["A red square.", "Two blue circles and a green triangle.", "Nothing at all here."]
    samples = [Sample(f"{p.prompt_id}#s0", p.prompt_id, t, "", t, True, 4, "stop") for p, t in zip(prompts, texts)]
    judge = _openai_judge(judge_server, tmp_path / "cache.sqlite")
    expected = [_judge_score(t) for t in texts]
    assert expected == pytest.approx([0.6, 0.58, 0.22])  # by hand: len % 11 and words % 11
    assert judge(prompts, samples) == pytest.approx(expected) and judge.failures == 0

    # one request per sample, carrying its prompt's image (decoded: the same pixels)
    requests = {_answer(r): r for r in judge_server.chat_requests}
    assert len(judge_server.chat_requests) == 3 and requests.keys() == set(texts)
    for p, t in zip(prompts, texts):
        (url,) = requests[t].image_urls()
        sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        assert sent.tobytes() == load_image(p.images[0]).convert("RGB").tobytes()
        assert p.question in requests[t].text()

    # re-scoring the same samples, in this run or a resumed one (a new client on the cache), asks nothing
    assert judge(prompts, samples) == pytest.approx(expected)
    assert _openai_judge(judge_server, tmp_path / "cache.sqlite")(prompts, samples) == pytest.approx(expected)
    (tmp_path / "words.py").write_text("def words(prompt, sample):\n    return len(sample.text.split())\n")
    both = combine([(2.0, judge), (0.5, function_reward(f"{tmp_path / 'words.py'}:words"))])
    assert both(prompts, samples) == pytest.approx([2 * e + 0.5 * len(t.split()) for e, t in zip(expected, texts)])
    assert len(judge_server.chat_requests) == 3


@pytest.mark.slow
def test_ppo_scores_its_rollouts_online_with_the_openai_judge(judge_server, tiny_qwen_dir, shapes, tmp_path):
    from alignkit.judge.rubric import neutralise

    judge, scored = _openai_judge(judge_server, tmp_path / "cache.sqlite"), []

    def recorded(prompts, samples):
        scored.append((prompts, samples))
        return judge(prompts, samples)

    # two prompts, four per step: each prompt twice, so sample ids repeat within the batch
    _, steps = _run(tiny_qwen_dir, shapes[:2], tmp_path / "run", steps=1, reward=RewardFn(judge.name, recorded),
                    prompts_per_step=4, num_samples=2)  # fmt: skip
    ((prompts, samples),) = scored
    texts = [s.text for s in samples]
    assert len(samples) == 8 and len(set(texts)) == 8
    assert len({s.sample_id for s in samples}) == 4
    assert steps[0]["reward/raw"] == pytest.approx(sum(map(_judge_score, texts)) / 8)
    assert steps[0]["reward/failures"] == 0
    assert len(judge_server.chat_requests) == 8
    assert all(len(r.image_urls()) == 1 for r in judge_server.chat_requests)
    assert sorted(_answer(r) for r in judge_server.chat_requests) == sorted(neutralise(t).strip() for t in texts)
    assert judge(prompts, samples) == pytest.approx([_judge_score(t) for t in texts])  # from the cache:
    assert len(judge_server.chat_requests) == 8  # no new request


def test_reward_model_reward_matches_the_score_stage(tiny_qwen_dir, shapes, tmp_path):
    from alignkit.reward.model import build_reward_model
    from alignkit.reward.score import score_samples
    from alignkit.sample.templates import load_template

    torch.manual_seed(0)
    rm_dir = build_reward_model(str(tiny_qwen_dir), "lora").save(tmp_path / "rm")  # random head: scores differ
    prompts = [shapes[0], shapes[1], shapes[0]]
    texts = ["A red square.\nAnswer: 1", "Two blue circles.\nAnswer: 2", "Nothing.\nAnswer: 0"]
    samples = [Sample(f"{p.prompt_id}#s{i}", p.prompt_id, t, "", t, True, 4, "stop")
               for i, (p, t) in enumerate(zip(prompts, texts))]  # fmt: skip
    options = {"num_critiques": 1, "max_new_tokens": 4, "batch_size": 2}
    reward = reward_model_reward(rm_dir, "cot", **options)
    scores = reward(prompts, samples)
    assert len(scores) == 3 and len({round(s, 4) for s in scores}) == 3 and reward.failures == 0
    # the score stage: the same reward model on the same answers, asked as the policy was (cot template)
    user_text = {p.prompt_id: load_template("cot").render(p.question) for p in shapes[:2]}
    score_samples(rm_dir, shapes[:2], samples, user_text, tmp_path / "rm_scores.jsonl", **options)
    direct = [json.loads(line)["rm_score"] for line in (tmp_path / "rm_scores.jsonl").read_text().splitlines()]
    assert scores == pytest.approx(direct, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# vLLM rollouts


@pytest.fixture
def vllm_engines(tmp_path, monkeypatch):
    """PPO's vLLM rollout engines (in-process), recording each rollout and keeping a copy of each adapter synced."""
    from alignkit.train import ppo

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: a spawned engine costs ~40 s of imports

    class Recorded(ppo.VllmRollouts):
        def __init__(self, *args, **kwargs):
            self.kept, self.rollouts = tmp_path / "kept", []  # rollouts: (adapter name, requests, seed, generations)
            super().__init__(*args, **kwargs)
            engines.append(self)

        def _save(self, policy, step):
            path = super()._save(policy, step)
            shutil.copytree(path, self.kept / path.name, dirs_exist_ok=True)
            return path

        def generate(self, requests, num_samples, seed):
            out = super().generate(requests, num_samples, seed)
            self.rollouts.append((Path(self.backend.lora.lora_path).name, requests, seed, out))
            return out

    engines = []
    monkeypatch.setattr(ppo, "VllmRollouts", Recorded)
    yield engines
    # Free the engine (and its memory) for the next test.
    engines.clear()
    gc.collect()


@pytest.mark.slow
def test_vllm_rollouts_sample_from_the_current_adapter(tiny_qwen_dir, shapes, tmp_path, vllm_engines):
    from safetensors.torch import load_file

    adapter, steps = _run(tiny_qwen_dir, shapes, tmp_path / "run", steps=2, save_steps=1, num_samples=2,
                          reward=RewardFn("length", _length), rollout="vllm",
                          vllm_options={"max_model_len": 512, "distributed_executor_backend": "uni",
                                        "kv_cache_memory": 0.25})  # fmt: skip
    assert [s["step"] for s in steps] == [1, 2] and (adapter / "adapter_model.safetensors").is_file()
    (engine,) = vllm_engines
    assert [r[0] for r in engine.rollouts] == ["step-0", "step-1"]
    # step 2 sampled from the policy after step 1: the adapter it loaded is checkpoint-1's
    step1 = load_file(engine.kept / "step-1" / "adapter_model.safetensors")
    checkpoint1 = load_file(tmp_path / "run" / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors")
    assert step1.keys() == checkpoint1.keys() and all(torch.equal(v, checkpoint1[k]) for k, v in step1.items())
    # and what the engine samples depends on that adapter: step 2's requests and seed, replayed with the
    # step-1 adapter, give step 2's rollout again; with the first adapter, other samples
    _, requests, seed, drawn = engine.rollouts[1]

    def replay(name):
        engine.backend.use_adapter(str(engine.kept / name))
        return [[g.token_ids for g in gens] for gens in engine.generate(requests, 2, seed)]

    assert replay("step-1") == [[g.token_ids for g in gens] for gens in drawn]
    assert replay("step-0") != [[g.token_ids for g in gens] for gens in drawn]


def test_vllm_rollouts_refuse_an_adapter_vllm_cannot_apply(tiny_qwen_dir, tmp_path):
    """A vision-tower LoRA cannot be loaded into vLLM each step: a clear error before any engine starts."""
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText

    from alignkit.models import lora_config
    from alignkit.train.ppo import VllmRollouts

    policy = get_peft_model(AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir),
                            lora_config(4, 8, target_modules=r".*visual\.blocks\.\d+\.attn\.qkv"))  # fmt: skip
    with pytest.raises(ValueError, match="cannot apply this one: it has weights outside the language model"):
        VllmRollouts(str(tiny_qwen_dir), policy, tmp_path / "adapter", None, max_new_tokens=8)


def test_a_sampled_image_placeholder_cuts_the_answer(tiny_qwen_dir, shapes):
    """An answer that samples a token the model fills with image features is trained on up to it."""
    from alignkit.models import load_policy
    from alignkit.models.inputs import placeholder_ids
    from alignkit.sample.base import Generation
    from alignkit.sample.templates import load_template
    from alignkit.train.ppo import collect

    policy, processor = load_policy(str(tiny_qwen_dir))
    placeholders = frozenset(placeholder_ids(policy.config))
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert image_pad in placeholders
    word = processor.tokenizer.convert_tokens_to_ids("yes")

    class FixedAnswers:  # a test engine: every prompt gets the same two token sequences
        group = None

        def generate(self, requests, k, seed):
            return [[Generation("", 3, "length", [word, image_pad, word]), Generation("", 2, "length", [word, word])]
                    for _ in requests]  # fmt: skip

    batch = collect(FixedAnswers(), processor, shapes[:1], load_template("plain"), 2, seed=0, placeholders=placeholders)
    assert batch.targets.tolist() == [[word, 0], [word, word]] and batch.mask.tolist() == [[1, 0], [1, 1]]


def test_a_prompt_the_in_process_vllm_engine_refuses_is_a_clear_error():
    """`ppo.rollout: vllm`: the engine's refusal (`RejectedPrompts`, raised by the vLLM backend with
    vLLM's reason) reaches the user as a StageInputError naming the prompt, not a traceback."""
    from alignkit.errors import StageInputError
    from alignkit.sample.base import RejectedPrompts
    from alignkit.train.ppo import VllmRollouts

    class Refusing:  # the backend's side of the contract: it raises what vllm_backend raises
        def generate(self, requests, num_samples, seed):
            raise RejectedPrompts({"p7": "prompt (3000 tokens) is longer than max_model_len 2048"}, [])

    rollouts = VllmRollouts.__new__(VllmRollouts)
    rollouts.backend = Refusing()
    with pytest.raises(StageInputError, match=r"refused 1 prompt\(s\): prompt p7: prompt \(3000 tokens\) is longer"):
        rollouts.generate([], 2, 0)
