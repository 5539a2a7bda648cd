"""`alignkit judge-eval` and the `judge.min_accuracy` gate: figures against hand counts on small
labelled files, judged by the localhost chat-completions fixture (scripted verdicts) or the
reference judge, bad labelled files, and the gate stopping `alignkit run` before any stage."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from alignkit.cli import app
from alignkit.errors import RecordError
from alignkit.judge import JudgeConfig
from alignkit.judge.calibration import judge_eval
from alignkit.records import write_jsonl
from alignkit.resources import builtin_dir
from alignkit.testing.chat_server import ChatServer, RecordedRequest

KEY_ENV = "ALIGNKIT_TEST_JUDGE_KEY"


def _between(text: str, start: str, end: str) -> str:
    return text.split(start)[-1].split(end)[0]


def pointwise_reply(body):
    """The overall judge's verdict: an answer marked `good-` is faithful and right, any other is not."""
    good = "good-" in _between(RecordedRequest("POST", "", {}, body).text(), "<answer>", "</answer>")
    return {"rationale": "r", "hallucination": 0 if good else 10, "correctness": 10 if good else 0}


def pairwise_reply(body):
    """The pairwise judge's verdict: the `good-` answer wins, two alike tie; a question saying
    `biased` gets "A" whatever is shown (position bias)."""
    text = RecordedRequest("POST", "", {}, body).text()
    if "biased" in _between(text, "<question>", "</question>"):
        return {"rationale": "r", "winner": "A"}
    a, b = ("good-" in _between(text, f"<answer_{x}>", f"</answer_{x}>") for x in "ab")
    return {"rationale": "r", "winner": "A" if a > b else "B" if b > a else "tie"}


@pytest.fixture
def image(tmp_path):
    Image.new("RGB", (32, 32), "white").save(tmp_path / "img.png")
    return "img.png"


def row(rid, a, b, label, image, **gold):
    return {"id": rid, "image": image, "question": "Describe the image.", "answer_a": a, "answer_b": b,
            "label": label, **gold}  # fmt: skip


def priced_judge(tmp_path, name):
    """A built-in judge file with a price of 1 per prompt token (0 per completion token)."""
    spec = yaml.safe_load((builtin_dir("judges") / f"{name}.yaml").read_text())
    spec["price"] = {"prompt_per_million": 1_000_000.0, "completion_per_million": 0.0}
    (tmp_path / f"{name}-priced.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(tmp_path / f"{name}-priced.yaml")


def prompt_tokens(requests):
    """The fixture server's token count (a word per token, 85 per image), summed over requests."""
    return sum(len(r.text().split()) + 85 * len(r.image_urls()) for r in requests)


def test_pointwise_llm_judge_figures_match_a_hand_count(tmp_path, image, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    gold = {"task": "describe", "objects": ["red circle"]}
    labels = tmp_path / "labels.jsonl"
    write_jsonl(labels, [
        row("r0", "good-0: a red circle", "bad-0: a blue square", "a", image, **gold),  # a: right, ref agrees
        row("r1", "bad-1: a blue square", "good-1: a red circle", "B", image, **gold),  # b: right, ref agrees
        row("r2", "good-2 one", "good-2 two", "tie", image),  # tie: right
        row("r3", "bad-3: a blue square", "good-3: a red circle", "a", image, **gold),  # b: wrong, ref agrees
        row("r4", "good-4: a red circle", "good-4: a blue square", "a", image, **gold),  # tie: wrong, ref says a
        {"image": image, "question": "Describe the image.", "chosen": "I look.\nAnswer: good-5",
         "rejected": "Answer: bad-5"},  # label implied a; the judge prefers a: right
    ])  # fmt: skip
    cfg = JudgeConfig(backend="openai", model="m", api_key_env=KEY_ENV, rubric=priced_judge(tmp_path, "overall"))
    with ChatServer(pointwise_reply) as srv:
        cfg.base_url = srv.url
        result = judge_eval(labels, cfg, tmp_path / "out.json", tmp_path / "cache.sqlite")
        sent = list(srv.chat_requests)
        assert len(sent) == 12 and all(len(r.image_urls()) == 1 for r in sent)  # 2 answers x 6, image attached
        again = judge_eval(labels, cfg, tmp_path / "again.json", tmp_path / "cache.sqlite")
        assert len(srv.chat_requests) == 12  # the re-run is answered by the verdict cache: nothing re-billed
    assert (result["records"], result["verdicts"], result["failed"], result["correct"]) == (6, 6, 0, 4)
    assert result["label_counts"] == {"a": 4, "b": 1, "tie": 1}
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["accuracy_ci"] == pytest.approx([0.3000, 0.9032], abs=1e-4)  # Wilson, 4 of 6
    assert result["tie_rate"] == pytest.approx(2 / 6)
    assert result["position_consistency"] is None  # pointwise: one answer per request, no order
    assert (result["reference_agreement"], result["reference_compared"]) == (pytest.approx(3 / 4), 4)
    assert result["per_1000_verdicts"]["requests"] == pytest.approx(2000)
    assert result["usage"]["cost"] == prompt_tokens(sent)
    assert result["per_1000_verdicts"]["cost"] == pytest.approx(1000 * prompt_tokens(sent) / 6)
    assert again["accuracy"] == result["accuracy"] and again["usage"]["requests"] == 0
    assert again["usage"]["cached"] == 12 and again["per_1000_verdicts"]["requests"] is None  # nothing measured
    written = json.loads((tmp_path / "out.json").read_text())
    assert [r["verdict"] for r in written["per_record"]] == ["a", "b", "tie", "b", "tie", "a"]


def test_pairwise_judge_position_consistency_and_tie_rate(tmp_path, image, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    labels = tmp_path / "labels.jsonl"
    write_jsonl(labels, [
        row("p0", "good-0", "bad-0", "a", image),  # both orders pick good: a, consistent, right
        row("p1", "bad-1", "good-1", "b", image),  # b, consistent, right
        {**row("p2", "good-2", "bad-2", "a", image), "question": "A biased question."},  # A then A: a tie, inconsistent
        row("p3", "good-3 x", "good-3 y", "tie", image),  # tie in both orders: consistent, right
    ])  # fmt: skip
    cfg = JudgeConfig(backend="openai", model="m", api_key_env=KEY_ENV, rubric=priced_judge(tmp_path, "pairwise"))
    with ChatServer(pairwise_reply) as srv:
        cfg.base_url = srv.url
        result = judge_eval(labels, cfg, tmp_path / "out.json", tmp_path / "cache.sqlite")
        sent = list(srv.chat_requests)
    assert len(sent) == 8  # both orders of 4 pairs
    assert (result["verdicts"], result["correct"]) == (4, 3) and result["accuracy"] == 0.75
    assert result["tie_rate"] == 0.5 and result["position_consistency"] == 0.75
    assert result["per_1000_verdicts"]["requests"] == pytest.approx(2000)
    assert result["per_1000_verdicts"]["cost"] == pytest.approx(1000 * prompt_tokens(sent) / 4)
    records = {r["id"]: r for r in json.loads((tmp_path / "out.json").read_text())["per_record"]}
    assert records["p2"]["positions"] == ["A", "A"] and records["p2"]["consistent"] is False


def test_a_transient_failure_stops_it_and_the_rerun_asks_only_for_that(tmp_path, image, monkeypatch):
    from alignkit.errors import StageIncomplete

    monkeypatch.setenv(KEY_ENV, "sk-test")
    labels = tmp_path / "labels.jsonl"
    write_jsonl(labels, [row("r0", "good-0", "bad-0", "a", image), row("r1", "bad-1", "good-1", "b", image)])
    cfg = JudgeConfig(backend="openai", model="m", api_key_env=KEY_ENV, max_retries=0)
    with ChatServer(pointwise_reply) as srv:
        cfg.base_url = srv.url
        srv.inject("server_error", when="bad-1")
        with pytest.raises(StageIncomplete, match=r"1 of 2 records failed for a transient reason \(the first: server"):
            judge_eval(labels, cfg, tmp_path / "out.json", tmp_path / "cache.sqlite")
        assert len(srv.chat_requests) == 4 and not (tmp_path / "out.json").exists()
        result = judge_eval(labels, cfg, tmp_path / "out.json", tmp_path / "cache.sqlite")
        assert len(srv.chat_requests) == 5  # the failed judgment only: the other three come from the cache
    assert (result["accuracy"], result["usage"]["requests"], result["usage"]["cached"]) == (1.0, 1, 3)
    assert result["per_1000_verdicts"]["requests"] == pytest.approx(2000)  # 1 request for half a verdict


def _pair(pid, chosen, rejected, image, **extra):
    """A record as alignkit's pairs.jsonl holds it (TRL conversations), with extra columns."""
    user = [{"type": "image"}, {"type": "text", "text": "Describe the image.\nThink step by step, then give the "
                                                       "final answer on the last line as 'Answer: <answer>'."}]  # fmt: skip
    turn = lambda t: [{"role": "assistant", "content": [{"type": "text", "text": t}]}]  # noqa: E731
    return {"pair_id": pid, "prompt_id": pid, "prompt": [{"role": "user", "content": user}], "chosen": turn(chosen),
            "rejected": turn(rejected), "images": [image], "margin": 1.0, **extra}  # fmt: skip


def test_reference_judge_on_a_pairs_file_through_the_cli(tmp_path, image):
    gold = {"task": "describe", "objects": ["red circle"]}
    labels = tmp_path / "pairs.jsonl"
    write_jsonl(labels, [
        _pair("q0", "I see a red circle.\nAnswer: a red circle", "Answer: a blue square", image, **gold),  # a: right
        _pair("q1", "Answer: a red circle", "Answer: a blue square", image, label="rejected", **gold),  # a: wrong
        _pair("q2", "Answer: a red circle", "Answer: a red circle and a green triangle", image, label="tie", **gold),
        _pair("q3", "Look.\nAnswer: a red circle", "Answer: a red circle", image, label="tie", **gold),  # tie: right
        _pair("q4", "Answer: yes", "Answer: no", image),  # no gold annotations: the reference judge cannot judge it
    ])  # fmt: skip
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "data": {"synthetic": {}}}))
    result = CliRunner().invoke(app, ["judge-eval", str(recipe), "--labels", str(labels)])
    assert result.exit_code == 0, result.output
    table = [line for line in result.output.splitlines() if not line.startswith("wrote ")]  # a path is never cut
    assert len(table) >= 12 and max(map(len, table)) <= 80
    assert "accuracy [95% CI]" in result.output and "0.500" in result.output
    figures = json.loads((tmp_path / "run" / "judge_eval.json").read_text())
    assert (figures["verdicts"], figures["correct"], figures["failed"]) == (4, 2, 1)
    assert figures["failed_reasons"] == {"no_reference": 1} and figures["tie_rate"] == 0.25
    assert figures["per_1000_verdicts"] == {"requests": 0.0, "cost": 0.0}  # the reference judge is free
    assert figures["reference_agreement"] is None  # the judge is the reference
    assert [r["verdict"] for r in figures["per_record"]] == ["a", "a", "a", "tie", None]


@pytest.mark.parametrize(
    "line, message",
    [
        ({"image": "img.png", "question": "Q?", "answer_a": "x", "answer_b": "y"}, r"labels.jsonl:2: label: required key missing"),
        ({"image": "img.png", "question": "Q?", "answer_a": "x", "answer_b": "y", "label": "c"}, r"labels.jsonl:2: label: 'c' is not one of a, b, tie"),
        ({"image": "img.png", "question": "Q?", "answer_a": "", "answer_b": "y", "label": "a"}, r"labels.jsonl:2: answer_a: expected a non-empty string"),
        ({"image": "img.png", "question": "Q?", "response": "x"}, r"labels.jsonl:2: a labelled record needs answer_a, answer_b and label, or chosen and rejected"),
        ({"image": "img.png", "answer_a": "x", "answer_b": "y", "label": "a"}, r"labels.jsonl:2: question: expected a non-empty string"),
        ({"image": "missing.png", "question": "Q?", "answer_a": "x", "answer_b": "y", "label": "a"}, r"labels.jsonl:2: image: .*missing.png: file not found"),
        ({"id": "r0", "image": "img.png", "question": "Q?", "answer_a": "x", "answer_b": "y", "label": "a"}, r"labels.jsonl:2: id: duplicate record id 'r0'"),
    ],
)  # fmt: skip
def test_a_bad_labelled_file_is_an_error_naming_file_line_and_key(tmp_path, image, line, message):
    labels = tmp_path / "labels.jsonl"
    write_jsonl(labels, [row("r0", "x", "y", "a", image), line])
    with pytest.raises(RecordError, match=message):
        judge_eval(labels, JudgeConfig(), tmp_path / "out.json", tmp_path / "cache.sqlite")
    assert not (tmp_path / "out.json").exists()


def test_the_cli_prints_one_line_for_bad_labels(tmp_path, image):
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps(row("r0", "x", "y", "a", image)) + "\n{not json\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "data": {"synthetic": {}}}))
    result = CliRunner().invoke(app, ["judge-eval", str(recipe), "--labels", str(labels)])
    assert result.exit_code == 2 and "labels.jsonl:2: not valid JSON" in result.output
    assert "Traceback" not in result.output
    missing = CliRunner().invoke(app, ["judge-eval", str(recipe)])
    assert missing.exit_code == 2 and "--labels FILE, or judge.calibration" in missing.output


def test_the_calibration_gate_stops_a_run_before_any_stage_and_lets_a_good_judge_through(tmp_path, image, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    write_jsonl(tmp_path / "labels.jsonl", [
        row("r0", "good-0", "bad-0", "a", image), row("r1", "bad-1", "good-1", "b", image),  # right
        row("r2", "good-2", "bad-2", "b", image), row("r3", "good-3", "good-3 y", "a", image),  # wrong
    ])  # fmt: skip
    recipe, run = tmp_path / "r.yaml", tmp_path / "run"
    with ChatServer(pointwise_reply) as srv:
        judge = {"backend": "openai", "model": "m", "base_url": srv.url, "api_key_env": KEY_ENV,
                 "calibration": "labels.jsonl", "min_accuracy": 0.9}  # fmt: skip
        recipe.write_text(yaml.safe_dump({"output_dir": str(run), "data": {"synthetic": {"num_prompts": 4}},
                                          "judge": judge}))  # fmt: skip
        stopped = CliRunner().invoke(app, ["run", str(recipe)])
        assert stopped.exit_code == 2, stopped.output
        assert "accuracy on" in stopped.output and "0.500" in stopped.output
        assert "below judge.min_accuracy=0.9: stopping before any stage runs" in stopped.output
        assert not (run / "prompts.jsonl").exists() and not (run / "samples.jsonl").exists()  # nothing ran
        assert len(srv.chat_requests) == 8
        assert json.loads((run / "calibration.json").read_text())["accuracy"] == 0.5

        passed = CliRunner().invoke(app, ["run", str(recipe), "judge.min_accuracy=0.5", "--stages", "prompts"])
        assert passed.exit_code == 0, passed.output
        assert (run / "prompts.jsonl").exists()
        assert len(srv.chat_requests) == 8  # the threshold is not part of the calibration: it is not asked again
        assert json.loads((run / "stages.json").read_text())["calibration"]["status"] == "done"


def test_min_accuracy_needs_a_calibration_file(tmp_path):
    from alignkit.errors import RecipeError
    from alignkit.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": "run", "data": {"synthetic": {}}, "judge": {"min_accuracy": 0.7}}))
    with pytest.raises(RecipeError, match="judge.min_accuracy needs judge.calibration"):
        load_recipe(recipe)
    assert load_recipe(recipe, ["judge.calibration=l.jsonl"]).judge.calibration == str(tmp_path / "l.jsonl")
