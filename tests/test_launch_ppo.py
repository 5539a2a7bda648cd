"""PPO as many processes (`launch.num_processes`): the train stage with train.method=ppo as 2 real gloo
processes trains like 1 process with the same global batch, a killed 2-process run resumes from its
checkpoint, and PPO asks accelerate where to put its models."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import torch

from alignkit.errors import RecipeError
from alignkit.models import device
from alignkit.recipe import load_recipe
from alignkit.runner import Runner
from alignkit.train import ppo as ppo_module
from tests.test_launch import _check_adapter_generates, alignkit_run, mark_lines_before, run_until_checkpoint

# Same global batch, other split. The rollouts are the same tokens (the transformers engine generates
# groups of sample.batch_size=2 prompts at fixed places of the step, each seeded by its place: both
# splits generate the same groups), so the rewards are equal; the log-probs, values and gradients
# differ by float rounding only (each process pads its own answers, gloo sums the gradients in
# another order), and so do the losses.
REL_TOL, ABS_TOL = 1e-4, 1e-5
STEPS = 3

RECIPE = """\
output_dir: {out}
stages: [prompts, train]
policy: {{model: "tiny:qwen2-vl"}}
data: {{synthetic: {{num_prompts: 8, seed: 2}}}}
sample: {{num_samples: 2, max_new_tokens: 8, template: plain, batch_size: 2}}
judge: {{backend: reference, rubric: overall}}
train: {{method: ppo, learning_rate: 0.01, save_steps: {save}}}
ppo:
  steps: {steps}
  prompts_per_step: {prompts}
  ppo_epochs: 2
  num_minibatches: 2
  rewards: [{{source: reference}}, {{source: function, path: "{length}:length", weight: 0.01}}]
"""


def _recipe(tmp_path, name: str, prompts: int, save: int = 100):
    """A PPO recipe: the reference judge plus a small dense reward (answer length), so scores vary."""
    length = tmp_path / "length_reward.py"
    length.write_text("def length(prompt, sample):\n    return float(len(sample.text))\n")
    path = tmp_path / f"{name}.yaml"
    path.write_text(RECIPE.format(out=tmp_path / name, prompts=prompts, save=save, steps=STEPS, length=length))
    return path


def _cli(recipe, *overrides: str) -> subprocess.CompletedProcess:
    return alignkit_run(recipe, *overrides)


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]


def _compare(one: list[dict], two: list[dict]) -> None:
    assert [s["step"] for s in one] == [s["step"] for s in two] == list(range(1, STEPS + 1))
    for key in ("reward/raw", "response_length"):  # the same rollouts
        assert [s[key] for s in two] == pytest.approx([s[key] for s in one], rel=1e-6), key
    for key in ("policy_loss", "value_loss", "kl", "entropy"):
        diffs = [abs(a[key] - b[key]) for a, b in zip(one, two)]
        print(f"{key}: per-step |diff| {[f'{d:.1e}' for d in diffs]}")
        assert [s[key] for s in two] == pytest.approx([s[key] for s in one], rel=REL_TOL, abs=ABS_TOL), key
    assert len({s["reward/raw"] for s in one}) > 1 and one[-1]["kl"] > 0  # rewards vary, the policy moved


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: 1 process, 4 prompts per step (in this process, through the runner)."""
    tmp = tmp_path_factory.mktemp("one")
    Runner(load_recipe(_recipe(tmp, "one", prompts=4))).run()
    return tmp / "one"


@pytest.mark.slow
def test_ppo_as_two_processes_trains_like_one_with_the_same_global_batch(one_process, tmp_path):
    done = _cli(_recipe(tmp_path, "two", prompts=2), "launch.num_processes=2")
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "two"
    summary = json.loads((run / "stages.json").read_text())["train"]["summary"]
    assert summary["num_processes"] == 2
    assert summary["global_prompts_per_step"] == 4 and summary["global_batch_size"] == 8  # 2 x 2 prompts x K=2
    one_summary = json.loads((one_process / "stages.json").read_text())["train"]["summary"]
    assert (one_summary["num_processes"], one_summary["global_batch_size"]) == (1, 8)
    _compare(_metrics(one_process), _metrics(run))
    assert not (run / "train" / "adapter.summary.json").exists() and not list((run / "train").glob("adapter.tmp*"))
    _check_adapter_generates(run / "train" / "adapter")


@pytest.mark.slow
def test_a_killed_two_process_ppo_run_resumes_from_its_checkpoint(one_process, tmp_path):
    recipe = _recipe(tmp_path, "killed", prompts=2, save=1)
    train = tmp_path / "killed" / "train"
    proc = run_until_checkpoint(recipe, train / "checkpoints", "launch.num_processes=2")
    os.killpg(proc.pid, signal.SIGKILL)  # alignkit, torchrun and both workers
    proc.wait()
    assert not (train / "adapter").exists()  # killed in the middle of training
    mark_lines_before(train / "metrics.jsonl")

    done = _cli(recipe, "launch.num_processes=2")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = _metrics(tmp_path / "killed")
    resumed_from = max(s["step"] for s in lines if s.get("before"))
    assert 1 <= resumed_from < STEPS
    assert [(s["step"], s.get("before", False)) for s in lines] == [(i, i <= resumed_from) for i in range(1, STEPS + 1)]
    assert json.loads((tmp_path / "killed" / "stages.json").read_text())["train"]["status"] == "done"
    # the resumed run continues the killed one: the metrics of an uninterrupted run (1 process, same global batch)
    _compare(_metrics(one_process), lines)
    _check_adapter_generates(train / "adapter")


@pytest.mark.slow
def test_ppo_asks_accelerate_where_to_put_its_models(tiny_qwen_dir, tmp_path, monkeypatch):
    from alignkit.records import Prompt, Sample
    from alignkit.sample.config import SampleConfig
    from alignkit.train.config import PpoConfig, TrainConfig
    from alignkit.train.rewards import RewardFn
    from alignkit.worlds.shapes import make_shapes_prompts

    seen: dict = {}
    real = device.make_accelerator

    def spy(settings, loop):
        acc = real(settings, loop)
        prepare, prepare_model = acc.prepare, acc.prepare_model

        def prepared(*objs):
            out = prepare(*objs)
            seen["policy_device"] = next(out[0].parameters()).device
            return out

        def prepared_model(model, **kw):
            out = prepare_model(model, **kw)
            seen["reference_device"] = next(out.parameters()).device
            return out

        acc.prepare, acc.prepare_model = prepared, prepared_model
        seen["accelerator"] = acc
        return acc

    def zero(prompts: list[Prompt], samples: list[Sample]) -> list[float]:
        return [0.0] * len(samples)

    monkeypatch.setattr(device, "make_accelerator", spy)
    shapes = make_shapes_prompts(tmp_path, 2, seed=0)
    ppo_module.train_ppo(shapes, tmp_path / "run", PpoConfig(steps=1, prompts_per_step=2, ppo_epochs=1, num_minibatches=1),
                         model=str(tiny_qwen_dir), reward=RewardFn("zero", zero),
                         sample=SampleConfig(num_samples=2, max_new_tokens=4, template="plain"),
                         train=TrainConfig(method="ppo", finetune="full"))  # fmt: skip
    acc = seen["accelerator"]
    assert seen["policy_device"] == seen["reference_device"] == acc.device  # placed by accelerate, not by the loop
    assert acc.mixed_precision == device.ComputeSettings().precision()  # "no" here: no GPU
    source = open(ppo_module.__file__).read()
    assert '"cuda"' not in source and '"cpu"' not in source and ".cuda(" not in source and ".to(torch" not in source


def test_minibatches_give_every_process_answers():
    assert ppo_module.check_minibatches(16, 4, world=2) == 4
    assert ppo_module.check_minibatches(10, 3, world=1) == 3  # 3 + 3 + 3 + 1: one process takes the 1
    with pytest.raises(RecipeError, match="ppo.num_minibatches=4: a rollout batch of 4 answers"):
        ppo_module.check_minibatches(4, 4, world=2)  # minibatches of 1 answer for 2 processes
    with pytest.raises(RecipeError, match=r"minibatches of 3 \(the last of 1\)"):
        ppo_module.check_minibatches(10, 3, world=2)  # the last minibatch's 1 answer for 2 processes


def test_ppo_runs_distributed_and_its_fingerprint_holds_the_launch(tmp_path):
    from alignkit.train.stage import TrainStage

    recipe = _recipe(tmp_path, "r", prompts=2)
    r = load_recipe(recipe, ["launch.num_processes=2"])
    assert TrainStage().distributed(r) and "launch" in TrainStage().config(r)


def test_masked_means_over_a_split_minibatch_add_up_to_the_whole():
    """Each process's share, normalised by the global token count, sums to the 1-process mean."""
    torch.manual_seed(0)
    x, mask = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).float()
    whole = ppo_module.masked_mean(x, mask)
    parts = [ppo_module.masked_mean(x[rows], mask[rows], mask.sum()) for rows in torch.arange(6).tensor_split(2)]
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-6)
    assert whole.item() == pytest.approx((x * mask).sum().item() / mask.sum().item(), rel=1e-6)  # by hand


def test_vllm_rollouts_in_many_processes_are_a_clear_error(monkeypatch, tmp_path):
    """Checked before any model loads: one vLLM engine per trainer process is not built yet."""
    from types import SimpleNamespace

    from alignkit.train.config import PpoConfig

    two = SimpleNamespace(process_index=0, num_processes=2, is_main_process=True)  # what accelerate says under a launch
    monkeypatch.setattr(device, "make_accelerator", lambda settings, loop: two)
    with pytest.raises(RecipeError, match="ppo.rollout: vllm runs in one process, not launch.num_processes=2"):
        ppo_module.train_ppo([], tmp_path, PpoConfig(rollout="vllm"), model="tiny:qwen2-vl", reward=None)
    assert not tmp_path.joinpath("metrics.jsonl").exists()
