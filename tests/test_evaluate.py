"""Evaluation metrics against hand counts: CHAIR, POPE, QA accuracy, routing and tables."""

import json

import pytest

from alignkit.evaluate import chair, compare, evaluate_answers, format_table, pope, pope_label, qa_accuracy
from alignkit.records import Prompt
from alignkit.worlds.shapes import make_shapes_prompts

# ---------------------------------------------------------------------------------------------
# CHAIR


def _counts(out: dict) -> dict:
    """A CHAIR result without its intervals (checked in tests/test_stats.py)."""
    return {k: v for k, v in out.items() if not k.endswith("_ci")}


def test_chair_hand_count_with_plurals_synonyms_repeats_and_empty():
    answers = [
        "There are two red squares and a blue disc.",  # red square (plural), blue circle (synonym): 2, 0
        "A red square, a green triangle and another red square.",  # 3 mentions (red square twice), 1 bad
        "",  # no mentions
        "A violet box and some circles.",  # purple square (synonyms), bare circle (absent): 2, 1
    ]
    gold = [
        ["red square", "blue circle"],
        ["red square", "blue circle"],
        ["red square"],
        ["purple square", "green triangle"],
    ]
    # every mention: 2+3+0+2 = 7, hallucinated 0+1+0+1 = 2 -> CHAIR_i 2/7
    # unique per answer: 2+2+0+2 = 6, hallucinated 2 -> 2/6; answers 2 and 4 bad -> CHAIR_s 2/4
    assert _counts(chair(answers, gold)) == {
        "chair_i": pytest.approx(2 / 7),
        "chair_i_unique": pytest.approx(2 / 6),
        "chair_s": 0.5,
        "mentions": 7,
        "hallucinated_mentions": 2,
        "unique_mentions": 6,
        "unique_hallucinated_mentions": 2,
        "answers": 4,
        "hallucinated_answers": 2,
    }


def test_chair_counts_every_mention_and_unique_objects_per_answer():
    # three surface forms of one object in one answer: 3 mentions as chair.py counts, 1 unique object
    one = chair(["a green triangle, a green triangle and two green triangles"], [["red square"]])
    assert (one["mentions"], one["hallucinated_mentions"], one["chair_i"]) == (3, 3, 1.0)
    assert (one["unique_mentions"], one["unique_hallucinated_mentions"], one["chair_i_unique"]) == (1, 1, 1.0)
    # a hallucinated object named twice weighs twice against one correct mention: 2/3 against 1/2
    mixed = chair(["a red square, a green triangle and a green triangle"], [["red square"]])
    assert (mixed["chair_i"], mixed["chair_i_unique"]) == (pytest.approx(2 / 3), 0.5)
    # the same object in two answers is two mentions either way
    two = chair(["green triangle", "green triangle"], [["red square"], ["red square"]])
    assert (two["mentions"], two["unique_mentions"], two["hallucinated_answers"]) == (2, 2, 2)


def test_chair_with_no_mentions_reports_zero_and_the_zero_count():
    out = chair(["", "There is nothing in the image."], [["red square"], []])
    assert out == {
        "chair_i": 0.0,
        "chair_i_ci": [0.0, 1.0],  # nothing measured: the interval says so
        "chair_i_unique": 0.0,
        "chair_i_unique_ci": [0.0, 1.0],
        "chair_s": 0.0,
        "chair_s_ci": [0.0, pytest.approx(0.6576, abs=1e-4)],  # Wilson 0 of 2: z^2 / (2 + z^2)
        "mentions": 0,
        "hallucinated_mentions": 0,
        "unique_mentions": 0,
        "unique_hallucinated_mentions": 0,
        "answers": 2,
        "hallucinated_answers": 0,
    }


def test_chair_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        chair(["a", "b"], [["red square"]])


# ---------------------------------------------------------------------------------------------
# POPE

POPE_PREDICTIONS = [
    "Yes",  # yes / gold yes -> tp
    "Yes, there is a red square.",  # yes / gold yes -> tp
    "No.",  # no / gold yes -> fn
    "no",  # no / gold no -> tn
    "There is not a blue circle in the image.",  # "not" -> no / gold no -> tn
    "Yes",  # yes / gold no -> fp
    "I can see a green triangle",  # neither yes nor no -> "yes" / gold no -> fp
    "No, there is none. Yes, really.",  # first sentence only -> no / gold no -> tn
]
POPE_LABELS = ["yes", "yes", "yes", "no", "no", "no", "no", "no"]


def test_pope_hand_counted_confusion_and_metrics():
    out = pope(POPE_PREDICTIONS, POPE_LABELS)
    # tp=2 fp=2 tn=3 fn=1; acc 5/8; precision 2/4; recall 2/3; F1 2*(1/2)(2/3)/(1/2+2/3) = 4/7; yes 4/8
    assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (2, 2, 3, 1)
    assert out["accuracy"] == pytest.approx(5 / 8)
    assert out["precision"] == pytest.approx(1 / 2)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(4 / 7)
    assert out["yes_ratio"] == pytest.approx(1 / 2)
    assert out["neither"] == 1  # only "I can see a green triangle"
    assert out["total"] == 8


def test_pope_label_follows_the_pope_script():
    assert pope_label("No, there is no cat.") == "no"
    assert pope_label("There is not one") == "no"
    assert pope_label("Maybe") == "yes"  # neither -> yes, as in the POPE script
    assert pope_label("Yes. No.") == "yes"  # only the first sentence counts


def test_pope_precision_recall_f1_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    out = pope(POPE_PREDICTIONS, POPE_LABELS)
    y_pred = [pope_label(p) for p in POPE_PREDICTIONS]
    kw = {"pos_label": "yes"}
    assert out["precision"] == pytest.approx(metrics.precision_score(POPE_LABELS, y_pred, **kw))
    assert out["recall"] == pytest.approx(metrics.recall_score(POPE_LABELS, y_pred, **kw))
    assert out["f1"] == pytest.approx(metrics.f1_score(POPE_LABELS, y_pred, **kw))


def test_pope_zero_denominators_and_bad_labels():
    out = pope(["no", "no"], ["no", "no"])  # no predicted or gold positives
    assert (out["precision"], out["recall"], out["f1"], out["accuracy"]) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="'maybe'"):
        pope(["yes"], ["maybe"])


# ---------------------------------------------------------------------------------------------
# QA accuracy


def test_qa_accuracy_count_with_digit_words():
    # "Two." == 2 ok; "2" == "two" ok; three != 2; "The answer is 4" -> 4 ok -> 3/4
    out = qa_accuracy(["Two.", "2", "three", "The answer is 4"], ["2", "two", "2", "4"], task="count")
    assert _counts(out) == {"accuracy": 0.75, "correct": 3, "total": 4}


def test_qa_accuracy_color_with_case_punctuation_and_synonym():
    # "Red!" ok; "It is BLUE." ok; violet == purple ok; green != red -> 3/4
    preds, refs = ["Red!", "It is BLUE.", "violet", "green"], ["red", "blue", "purple", "red"]
    out = qa_accuracy(preds, refs, task="color")
    assert _counts(out) == {"accuracy": 0.75, "correct": 3, "total": 4}


def test_qa_accuracy_ignores_articles():
    # "circle" vs "a circle" ok; "The Circle." vs "circle" ok; "square" vs "a circle" wrong -> 2/3
    out = qa_accuracy(["circle", "The Circle.", "square"], ["a circle", "circle", "a circle"])
    assert _counts(out) == {"accuracy": pytest.approx(2 / 3), "correct": 2, "total": 3}


def test_qa_accuracy_empty_is_zero_over_zero():
    assert qa_accuracy([], []) == {"accuracy": 0.0, "accuracy_ci": [0.0, 1.0], "correct": 0, "total": 0}


# ---------------------------------------------------------------------------------------------
# routing


def _prompts() -> list[Prompt]:
    return [
        Prompt("d1", "Describe the image.", task="describe", objects=["red square", "blue circle"]),
        Prompt("e1", "Is there a red square in the image?", task="exists", reference_answer="yes"),
        Prompt("e2", "Is there a green circle in the image?", task="exists", reference_answer="no"),
        Prompt("c1", "How many shapes are in the image?", task="count", reference_answer="2"),
        Prompt("k1", "What color is the square?", task="color", reference_answer="red"),
        Prompt("o1", "Anything else?", task="open"),
    ]


def test_evaluate_answers_routes_by_task():
    answers = {
        "d1": "A red square and a green triangle.",  # 2 mentions, 1 hallucinated
        "e1": "Yes",  # tp
        "e2": "Yes",  # fp
        "c1": "two",  # correct
        "k1": "blue",  # wrong
        "o1": "whatever",  # not scored
    }
    out = evaluate_answers(_prompts(), answers)
    assert out["num_prompts"] == 6
    describe = out["describe"]
    assert (describe["chair_i"], describe["chair_s"], describe["mentions"]) == (0.5, 1.0, 2)
    assert (out["exists"]["tp"], out["exists"]["fp"], out["exists"]["accuracy"]) == (1, 1, 0.5)
    assert _counts(out["count"]) == {"accuracy": 1.0, "correct": 1, "total": 1}
    assert _counts(out["color"]) == {"accuracy": 0.0, "correct": 0, "total": 1}
    assert _counts(out["qa"]) == {"accuracy": 0.5, "correct": 1, "total": 2}  # 1 of 2 count+color
    assert out["unscored"] == {"open": 1}
    # per-answer rows for paired tests, by prompt_id (COLUMNS: answers, then the task's counts)
    assert out["outcomes"] == {
        "describe": {"d1": [1, 2, 1, 2, 1, 1]},
        "exists": {"e1": [1, 1, 0, 0, 0], "e2": [1, 0, 1, 0, 0]},
        "count": {"c1": [1, 1]},
        "color": {"k1": [1, 0]},
    }
    assert json.loads(json.dumps(out)) == out


def test_evaluate_answers_missing_answer_names_the_prompt():
    with pytest.raises(ValueError, match="c1"):
        evaluate_answers(_prompts()[:4], {"d1": "", "e1": "yes", "e2": "no"})


def test_evaluate_answers_missing_gold_names_the_prompt():
    with pytest.raises(ValueError, match="d2.*gold objects"):
        evaluate_answers([Prompt("d2", "Describe the image.", task="describe")], {"d2": "a box"})


def test_reference_answers_of_the_shapes_world_score_perfectly(tmp_path):
    prompts = make_shapes_prompts(tmp_path, 12)
    out = evaluate_answers(prompts, {p.prompt_id: p.reference_answer for p in prompts})
    assert out["describe"]["mentions"] > 0 and out["describe"]["chair_i"] == 0.0
    assert out["exists"]["accuracy"] == 1.0 and out["exists"]["neither"] == 0
    assert out["qa"]["accuracy"] == 1.0 and out["qa"]["total"] == 6


# ---------------------------------------------------------------------------------------------
# tables


def test_format_table_lists_every_metric():
    table = format_table({"num_prompts": 3, "count": {"accuracy": 0.5, "correct": 1, "total": 2}})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "value"]
    assert [line.split() for line in lines[2:]] == [
        ["num_prompts", "3"],
        ["count.accuracy", "0.5000"],
        ["count.correct", "1"],
        ["count.total", "2"],
    ]


def test_compare_shows_deltas_and_missing_metrics():
    before = {"describe": {"chair_i": 0.5, "mentions": 4}}
    after = {"describe": {"chair_i": 0.25, "mentions": 6}, "qa": {"accuracy": 1.0}}
    rows = [line.split() for line in compare(before, after).splitlines()[2:]]
    assert rows == [
        ["describe.chair_i", "0.5000", "0.2500", "-0.2500"],
        ["describe.mentions", "4", "6", "+2"],
        ["qa.accuracy", "-", "1.0000", "-"],
    ]
