"""Paired comparison of two evaluations: McNemar for per-question rates, a paired bootstrap for CHAIR."""

import json

import pytest
from typer.testing import CliRunner

from alignkit.cli import app
from alignkit.evaluate import compare, evaluate_answers, format_table, paired_tests
from alignkit.records import Prompt

GOLD = ["yes", "no"] * 32  # 64 POPE-style questions
PROMPTS = [Prompt(f"e{i}", "Is there a red square?", task="exists", reference_answer=g) for i, g in enumerate(GOLD)]


def _flip(label: str) -> str:
    return "no" if label == "yes" else "yes"


def _pope_run(correct: set[int]) -> dict:
    answers = {f"e{i}": g if i in correct else _flip(g) for i, g in enumerate(GOLD)}
    return evaluate_answers(PROMPTS, answers)


def _row(table: str, metric: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(metric + " "))


def test_a_small_pope_change_is_not_significant():
    # A right on 0-33 (0.53), B right on 0-29 and 34-35 (0.50): discordant 4 vs 2
    before, after = _pope_run(set(range(34))), _pope_run(set(range(30)) | {34, 35})
    test = paired_tests(before, after)["exists.accuracy"]
    assert (test["n10"], test["n01"]) == (4, 2)
    assert test["p"] == pytest.approx(2 * (1 + 6 + 15) / 64)  # 2 * P(X <= 2), X ~ Bin(6, 1/2) = 0.6875
    row = _row(compare(before, after), "exists.accuracy")
    assert row.split()[:4] == ["exists.accuracy", "0.5312", "0.5000", "-0.0312"]
    assert row.split()[-2:] == ["p=0.688", "n.s."]


def test_a_large_pope_change_is_significant():
    before, after = _pope_run(set(range(34))), _pope_run(set(range(60)))
    table = compare(before, after)
    assert _row(table, "exists.accuracy").split()[-1] == "p<0.001"  # 26 vs 0 discordant: 2 / 2^26
    assert "n.s." not in _row(table, "exists.accuracy")
    assert "exists.precision" in paired_tests(before, after)  # bootstrapped: its delta has an interval
    assert "[" in _row(table, "exists.precision")


def _chair_run(answers: list[str]) -> dict:
    prompts = [Prompt(f"d{i}", "Describe.", task="describe", objects=["red square"]) for i in range(len(answers))]
    return evaluate_answers(prompts, {f"d{i}": a for i, a in enumerate(answers)})


def test_chair_identical_runs_differ_by_zero_not_significantly():
    run = _chair_run(["a red square and a blue circle", "a red square", "a green triangle"] * 10)
    tests = paired_tests(run, run)
    assert tests["describe.chair_i"] == {"diff": 0.0, "ci": [0.0, 0.0], "p": 1.0, "significant": False}
    assert tests["describe.chair_s"]["p"] == 1.0
    assert _row(compare(run, run), "describe.chair_i").split()[-1] == "n.s."


def test_chair_clearly_lower_is_significant():
    before = _chair_run(["a red square and a blue circle"] * 30)  # CHAIR_i 0.5
    after = _chair_run(["a red square"] * 30)  # 0
    tests = paired_tests(before, after)
    assert tests["describe.chair_i"]["diff"] == -0.5 and tests["describe.chair_i"]["significant"]
    assert tests["describe.chair_s"]["significant"]  # 30 answers all flip: McNemar p = 2 / 2^30
    row = _row(compare(before, after), "describe.chair_i")
    assert "-0.5000 [-0.5000, -0.5000]" in row and "n.s." not in row


def test_results_print_each_rate_with_its_interval():
    table = format_table(_pope_run(set(range(34))))
    row = _row(table, "exists.accuracy").split(maxsplit=1)[1]
    assert row == "0.5312 [0.4107, 0.6482]"  # Wilson for 34 of 64 (tests/test_stats.py checks the formula)
    assert "outcomes" not in table


def test_cli_compare_reads_results_or_their_folders(tmp_path):
    for name, correct in (("base", set(range(34))), ("round-1", set(range(60)))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_pope_run(correct), indent=2))
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "base"), str(tmp_path / "round-1" / "results.json")])
    assert result.exit_code == 0, result.output
    assert "exists.accuracy" in result.output and "p<0.001" in result.output


def test_cli_compare_refuses_different_questions_and_bad_outcomes(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    run = _pope_run(set(range(34)))
    a.write_text(json.dumps(run))
    fewer = evaluate_answers(PROMPTS[:-1], {p.prompt_id: "yes" for p in PROMPTS[:-1]})
    b.write_text(json.dumps(fewer))
    result = CliRunner().invoke(app, ["compare", str(a), str(b)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{a} vs {b}: exists: the two evaluations answered different questions (prompt_id e63" in result.output
    run["outcomes"]["exists"]["e5"] = [1, 0]
    b.write_text(json.dumps(run))
    result = CliRunner().invoke(app, ["compare", str(a), str(b)])
    assert result.exit_code == 2 and "outcomes.exists.e5: expected 5 counts (answers, tp, fp, tn, fn)" in result.output
