"""NaN and infinity are failures, not numbers: in judge scores, rewards, MM-DPO margins and losses."""

import json
import math
from types import SimpleNamespace

import pytest

from alignkit.errors import NonFiniteError, finite
from alignkit.judge.openai_judge import parse_verdict
from alignkit.judge.rubric import JudgeError, load_rubric
from alignkit.records import Prompt, Sample
from alignkit.train.rewards import RewardFn


def test_finite_passes_numbers_and_names_what_is_not():
    assert finite(0.25, "x") == 0.25
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(NonFiniteError, match=rf"sft step 3: the loss is {bad}"):
            finite(bad, "sft step 3: the loss")


def test_a_nan_judge_score_is_an_invalid_verdict():
    from alignkit.judge.rubric import validate_instance

    verdict = parse_verdict('{"rationale": "r", "hallucination": NaN, "correctness": 10}')  # Python's json reads NaN
    with pytest.raises(JudgeError, match="hallucination"):
        load_rubric("overall").validate(verdict)
    number = {"type": "number", "minimum": 0, "maximum": 10}  # NaN would slip past min/max comparisons
    assert validate_instance(math.nan, number) == ["verdict: expected number, got float"]
    assert validate_instance(math.inf, number) == ["verdict: expected number, got float"]


def test_a_nan_or_infinite_reward_is_a_counted_failure():
    prompts = [Prompt("p", "q")] * 4
    samples = [Sample(f"p#s{i}", "p", "t", "", "a", True, 1, "stop") for i in range(4)]
    reward = RewardFn("r", lambda ps, ss: [1.0, math.nan, math.inf, None])
    assert reward(prompts, samples) == [1.0, 0.0, 0.0, 0.0] and reward.failures == 3


def test_a_nan_margin_stops_mmdpo_before_any_model_is_loaded(tmp_path):
    from alignkit.train.config import TrainConfig
    from alignkit.train.mmdpo import train_mmdpo

    row = {"pair_id": "a>b", "prompt_id": "a", "prompt": [{"role": "user", "content": [{"type": "text", "text": "q"}]}],
           "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "x"}]}],
           "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "y"}]}], "images": [],
           "margin": math.nan}  # fmt: skip
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(row) + "\n")  # json writes NaN
    with pytest.raises(NonFiniteError, match=r"pairs.jsonl: pair a>b: margin is nan"):
        train_mmdpo(pairs, tmp_path / "run", TrainConfig(method="mmdpo"), model=str(tmp_path / "no-model-here"))


def test_a_nan_loss_stops_a_trl_run_before_that_step_is_saved(tmp_path):
    from alignkit.train.common import MetricsJsonl

    callback = MetricsJsonl(tmp_path / "metrics.jsonl")
    state = SimpleNamespace(is_world_process_zero=True, global_step=7)
    callback.on_train_begin(None, state, None)
    callback.on_log(None, state, None, logs={"loss": 0.5})
    with pytest.raises(NonFiniteError, match="step 7: the loss is nan"):
        callback.on_log(None, state, None, logs={"loss": math.nan})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1  # the NaN step is not logged
