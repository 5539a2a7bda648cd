"""PPO: its formulas against hand computation, its rewards, and short runs on the tiny Qwen2-VL."""

import dataclasses
import json
import math

import pytest
import torch

from alignkit.recipe import PpoConfig
from alignkit.records import Prompt, Sample
from alignkit.train.ppo import (
    AdaptiveKL, PPOConfig, RunningMeanStd, gae, kl_penalised_rewards, policy_loss, step_prompts, value_loss,
)  # fmt: skip
from alignkit.train.rewards import RewardFn, combine, function_reward, judge_reward


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


def test_recipe_defaults_are_the_algorithm_defaults():
    recipe = PpoConfig().model_dump(exclude={"rollout", "rewards"})
    algorithm = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    assert recipe == {k: algorithm[k] for k in recipe}


# ---------------------------------------------------------------------------------------------
# rewards


def _prompt_and_samples() -> tuple[list[Prompt], list[Sample]]:
    prompt = Prompt("p", "Describe the image.", [], "describe", None, ["red square"])
    texts = ["There is a red square.", "There is a red square and a blue circle."]
    return [prompt, prompt], [Sample(f"p#s{i}", "p", t, "", t, True, 5, "stop") for i, t in enumerate(texts)]


def test_reference_judge_reward_and_weighted_sum(tmp_path):
    prompts, samples = _prompt_and_samples()
    reference = judge_reward(rubric="overall", backend="reference", cache_path=tmp_path / "c.sqlite")
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
    from alignkit.testing.shapes import make_shapes_prompts

    return make_shapes_prompts(tmp_path_factory.mktemp("ppo"), 8, seed=0)


def _run(tiny_qwen_dir, shapes, out_dir, steps: int, **overrides):
    from alignkit.train.ppo import train_ppo

    config = PPOConfig(steps=steps, prompts_per_step=4, num_samples=4, max_new_tokens=12, learning_rate=1e-2,
                       ppo_epochs=2, num_minibatches=2, **overrides)  # fmt: skip
    adapter = train_ppo(shapes, out_dir, model=str(tiny_qwen_dir), reward=RewardFn("red", _says_red),
                        config=config, template="plain")  # fmt: skip
    return adapter, [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


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
    assert runner.trained_policy() == (str(tiny_qwen_dir), str(runner.paths.adapter))
    assert len((runner.paths.train / "metrics.jsonl").read_text().splitlines()) == 2
