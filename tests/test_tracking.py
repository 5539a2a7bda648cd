"""Tracking: with `tracking.report_to: tensorboard` every trainer's logged steps reach TensorBoard
with the numbers metrics.jsonl holds, and eval's results are logged at the end; a tracker whose
package is missing is a clear error; where the curves go re-runs nothing."""

from __future__ import annotations

import json

import pytest

from alignkit.errors import SetupError
from alignkit.recipe import load_recipe
from alignkit.runner import Runner
from alignkit.tracking import StepLog, Tracking, TrackingConfig, numbers

RECIPE = """\
output_dir: {out}
stages: [sft, prompts, sample, judge, pairs, reward_model, train, eval]
policy: {{model: "tiny:qwen2-vl"}}
data: {{synthetic: {{num_prompts: 4, seed: 0}}}}
sft: {{synthetic: {{num_examples: 16}}, max_steps: 3, batch_size: 4, warmup_steps: 1, logging_steps: 1}}
sample: {{backend: transformers, num_samples: 3, max_new_tokens: 16, template: plain}}
judge: {{backend: reference, rubric: overall}}
pairs: {{strategy: threshold}}
reward_model: {{finetune: lora, max_steps: 2, batch_size: 2, eval_fraction: 0.0, num_critiques: 0}}
train: {{method: dpo, batch_size: 2, max_steps: 2}}
eval: {{synthetic: {{num_prompts: 4, seed: 9}}, max_new_tokens: 8, judge: false}}
tracking: {{report_to: {report_to}, run_name: tracked}}
"""


def _scalars(directory) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Every scalar TensorBoard holds under `directory`, by run (sub-directory) and tag."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(directory))
    mux.Reload()
    return {run: {tag: [(e.step, e.value) for e in mux.Scalars(run, tag)] for tag in tags["scalars"]}
            for run, tags in mux.Runs().items()}  # fmt: skip


@pytest.mark.slow
def test_every_trainer_and_eval_reach_tensorboard(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "run", report_to="tensorboard"))
    Runner(load_recipe(recipe)).run()
    run = tmp_path / "run"
    scalars = _scalars(run / "tracking")
    for stage, metrics in (("sft", run / "sft" / "metrics.jsonl"), ("reward_model", run / "reward_model" / "metrics.jsonl"),
                           ("train", run / "train" / "metrics.jsonl")):  # fmt: skip
        logged = [json.loads(line) for line in metrics.read_text().splitlines()]
        tags = next(v for k, v in scalars.items() if k.startswith(f"tracked/{stage}"))
        # the same steps and values as metrics.jsonl (TensorBoard stores float32)
        assert tags["loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in logged], stage
    evals = next(v for k, v in scalars.items() if k.startswith("tracked/eval"))
    base = json.loads((run / "eval" / "base" / "results.json").read_text())
    after = json.loads((run / "eval" / "round-1" / "results.json").read_text())
    key = next(k for k, v in numbers(base).items() if k in numbers(after))
    assert evals[key] == [(0, pytest.approx(numbers(base)[key], rel=1e-6)),
                          (1, pytest.approx(numbers(after)[key], rel=1e-6))]  # fmt: skip

    # where the curves go is not a setting of any stage: nothing re-runs without a tracker
    before = json.loads((run / "stages.json").read_text())
    recipe.write_text(RECIPE.format(out=run, report_to="none"))
    Runner(load_recipe(recipe)).run()
    after_state = json.loads((run / "stages.json").read_text())
    assert {k: v["fingerprint"] for k, v in after_state.items()} == {k: v["fingerprint"] for k, v in before.items()}


def test_a_tracker_without_its_package_is_a_clear_error(tmp_path):
    pytest.importorskip("tensorboard")
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    tracking = Tracking.for_stage(TrackingConfig(report_to="wandb"), tmp_path, "train")
    with pytest.raises(SetupError, match=r"tracking.report_to: wandb needs its package \(pip install wandb\)"):
        StepLog(tmp_path / "metrics.jsonl", tracking)


def test_the_step_log_writes_jsonl_and_tracks_the_numbers(tmp_path):
    log = StepLog(tmp_path / "m.jsonl", Tracking.for_stage(TrackingConfig(report_to="tensorboard"), tmp_path, "sft"))
    log.write({"step": 1, "loss": 2.5, "note": "text", "nested": {"a": 1}, "nan": float("nan")})
    log.write({"step": 2, "loss": 1.5})
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [line["loss"] for line in lines] == [2.5, 1.5] and lines[0]["note"] == "text"
    tags = _scalars(tmp_path / "tracking")[f"{tmp_path.resolve().name}/sft"]
    assert tags["loss"] == [(1, 2.5), (2, 1.5)] and tags["nested/a"] == [(1, 1.0)]
    assert "nan" not in tags and "note" not in tags  # only finite numbers are plotted
