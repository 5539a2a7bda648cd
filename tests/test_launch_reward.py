"""Many processes (`launch.num_processes`) for the critique reward model: the `reward_model` stage as 2
real gloo processes, killed after a checkpoint and run again, resumes and trains like 1 process with
the same global batch; the `score` stage as 2 processes gives the scores of 1; the training loop
asks accelerate where to put its model, and gradient accumulation takes the whole batch's step."""

from __future__ import annotations

import json
import signal
import subprocess

import psutil
import pytest

from alignkit.recipe import load_recipe
from alignkit.records import Prompt, Sample, read_records
from alignkit.runner import Runner
from tests.test_launch import alignkit_run, mark_lines_before, run_until_checkpoint, spy_on_accelerator
from tests.test_reward import shapes_pairs

# Same global batch, other split: each process pads its own half of the batch and the gradients are
# all-reduced in fp32 over gloo, so the losses agree to float rounding, not bit for bit (measured:
# relative differences of about 1e-7).
REL_TOL = 1e-5

RECIPE = """\
output_dir: {out}
data: {{synthetic: {{num_prompts: 8}}}}
sample: {{template: plain}}
reward_model: {{model: "tiny:qwen2-vl", max_steps: 8, batch_size: {batch}, learning_rate: 0.001, eval_fraction: 0.25,
                max_critique_tokens: 4, num_critiques: 2, score_batch_size: 4, save_steps: {save}}}
"""


def _run(tmp_path, name: str, batch: int, save: int = 100):
    """A recipe whose run directory holds prompts, samples and pairs with the reference judge's rationales."""
    run = tmp_path / name
    shapes_pairs(run, 8, seed=4)
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPE.format(out=run, batch=batch, save=save))
    return recipe, run


def _cli(recipe, *args: str) -> subprocess.CompletedProcess:
    return alignkit_run(recipe, "--stages", *args)


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "reward_model" / "metrics.jsonl").read_text().splitlines()]


def _losses(run) -> list[float]:
    return [m["loss"] for m in _metrics(run)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: 1 process, batch 4 (in this process, through the runner)."""
    tmp = tmp_path_factory.mktemp("rm-one")
    recipe, run = _run(tmp, "one", batch=4)
    Runner(load_recipe(recipe)).run(["reward_model"])
    return run


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """2 processes, batch 2 (the same global batch), through the CLI: killed (all its processes) after
    its first checkpoint, then run again with the `score` stage. The metric lines written before the
    kill are marked `before`: a resumed run keeps them, a fresh start would rewrite them."""
    tmp = tmp_path_factory.mktemp("rm-two")
    recipe, run = _run(tmp, "two", batch=2, save=2)
    proc = run_until_checkpoint(recipe, run / "reward_model" / "checkpoints", "--stages", "reward_model",
                                "launch.num_processes=2")  # fmt: skip
    # alignkit, torchrun and both workers (torchrun starts each worker in a session of its own)
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "reward_model" / "model").exists()  # killed in the middle of training
    mark_lines_before(run / "reward_model" / "metrics.jsonl")

    done = _cli(recipe, "reward_model,score", "launch.num_processes=2")
    assert done.returncode == 0, done.stdout + done.stderr
    return run


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_after_a_kill(one_process, two_processes):
    run = two_processes
    state = json.loads((run / "stages.json").read_text())
    summary = state["reward_model"]["summary"]
    assert state["reward_model"]["status"] == "done"
    assert summary["num_processes"] == 2 and summary["global_batch_size"] == 4
    one_summary = json.loads((one_process / "stages.json").read_text())["reward_model"]["summary"]
    assert one_summary["num_processes"] == 1 and one_summary["global_batch_size"] == 4

    # resumed from the last complete checkpoint: the lines before it kept, the rest written once
    lines = _metrics(run)
    resumed_from = max(m["step"] for m in lines if m.get("before"))
    assert 2 <= resumed_from < 8 and resumed_from % 2 == 0
    assert [(m["step"], m.get("before", False)) for m in lines] == [(s, s <= resumed_from) for s in range(1, 9)]
    assert not (run / "reward_model" / "checkpoints").exists()

    # every step, before and after the kill, takes 1 x 4's step: each loss part (the critique CE
    # over the global batch's tokens included) and the accuracy
    one = _metrics(one_process)
    print("per-step |loss diff| (rel):", [f"{abs(a['loss'] - b['loss']) / abs(a['loss']):.1e}" for a, b in zip(one, lines)])
    # each part to REL_TOL of the step's whole loss: a small part (`center`, 2% of the loss) can differ by
    # 1e-5 of itself where the processes sum in another order (measured on an AMD EPYC)
    scale = REL_TOL * max(m["loss"] for m in one)
    for part in ("loss", "bradley_terry", "center", "critique_ce", "accuracy"):
        assert [m[part] for m in lines] == pytest.approx([m[part] for m in one], rel=REL_TOL, abs=scale), part
    assert len({m["loss"] for m in one}) > 1 and one[0]["critique_ce"] > 0  # it trained, on critiques
    # the held-out evaluation, shared between the processes, saw all held-out prompts
    assert summary["held_out"]["num_prompts"] == one_summary["held_out"]["num_prompts"] == 2
    assert summary["held_out"]["acc"] == one_summary["held_out"]["acc"]


@pytest.mark.slow
def test_two_processes_score_like_one(two_processes, tmp_path):
    """The 2-process rm_scores are those of 1 process scoring the same model, sampled critiques included."""
    from alignkit.reward.config import RewardModelConfig, score_options
    from alignkit.reward.score import score_samples
    from alignkit.sample.templates import load_template

    run = two_processes
    state = json.loads((run / "stages.json").read_text())
    assert state["score"]["summary"]["num_processes"] == 2
    assert "score:samples" in state  # the step the main worker recorded survived the runner's own write

    prompts, samples = read_records(run / "prompts.jsonl", Prompt), read_records(run / "samples.jsonl", Sample)
    template = load_template("plain")
    cfg = RewardModelConfig(max_critique_tokens=4, num_critiques=2, score_batch_size=4)
    single = score_samples(run / "reward_model" / "model", prompts, samples,  # load_reward_model, one process
                           {p.prompt_id: template.render(p.question) for p in prompts}, tmp_path / "single.jsonl",
                           seed=0, **score_options(cfg))  # fmt: skip
    assert single["num_processes"] == 1 and single["num_scored"] == 16
    a = [json.loads(line) for line in (tmp_path / "single.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (run / "rm_scores.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in b] == [s.sample_id for s in samples]  # gathered in the original order
    assert [r["rm_critiques"] for r in b] == [r["rm_critiques"] for r in a]
    assert all(len(r["rm_critiques"]) == 2 for r in b)
    assert any(len(set(r["rm_critiques"])) == 2 for r in b)  # sampled: the seeds reached the processes' halves
    # each answer is scored in the same batch as in one process: equal up to float printing
    assert [r["rm_score"] for r in b] == pytest.approx([r["rm_score"] for r in a], rel=1e-6, abs=1e-6)
    assert len({r["rm_score"] for r in b}) > 1
    pairs = [json.loads(line) for line in (run / "pairs.jsonl").read_text().splitlines()]
    assert all(p["rm_margin"] == pytest.approx(p["rm_chosen_score"] - p["rm_rejected_score"]) for p in pairs)


@pytest.mark.slow
def test_the_loop_asks_accelerate_where_to_put_its_model(tiny_qwen_dir, tmp_path, monkeypatch):
    from alignkit.models import device
    from alignkit.reward import score as rm_score
    from alignkit.reward import train as rm_train
    from alignkit.reward.config import RewardModelConfig

    pairs = shapes_pairs(tmp_path / "data", 4, seed=5)
    seen = spy_on_accelerator(monkeypatch, rm_train)
    cfg = RewardModelConfig(max_steps=1, batch_size=2, eval_fraction=0)
    rm_train.train_reward_model(pairs, tmp_path / "rm", cfg, model=str(tiny_qwen_dir))
    acc = seen["accelerator"]
    assert seen["model_device"] == seen["head_device"] == acc.device  # placed by accelerate.prepare
    assert acc.mixed_precision == device.ComputeSettings().precision()  # "no" here: no GPU
    for module in (rm_train, rm_score):
        source = open(module.__file__).read()
        assert '"cuda"' not in source and '"cpu"' not in source and ".cuda(" not in source


@pytest.mark.slow
def test_gradient_accumulation_takes_the_step_of_the_whole_batch(tiny_qwen_dir, tmp_path):
    """batch 2 × grad_accum 2 = batch 4: every mean of the loss is over the global batch."""
    from alignkit.reward.config import RewardModelConfig
    from alignkit.reward.train import train_reward_model

    pairs = shapes_pairs(tmp_path / "data", 8, seed=6)
    losses = {}
    for name, batch, accum in (("whole", 4, 1), ("accumulated", 2, 2)):
        cfg = RewardModelConfig(max_steps=3, batch_size=batch, grad_accum=accum, learning_rate=1e-3, eval_fraction=0)
        summary = train_reward_model(pairs, tmp_path / name, cfg, model=str(tiny_qwen_dir))
        assert summary["global_batch_size"] == 4
        losses[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert losses["accumulated"] == pytest.approx(losses["whole"], rel=REL_TOL)
