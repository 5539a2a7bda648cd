"""RLAIF-V's pair construction (`pairs.strategy: rlaifv`) and every strategy's length-bias summary,
each against a hand count on hand-built samples and verdicts."""

import pytest
from pydantic import ValidationError

from alignkit.pairs import build_pairs
from alignkit.pairs.config import PairsConfig
from alignkit.records import Prompt, Sample, Verdict


def words(n: int, word: str = "w") -> str:
    return " ".join([word] * n)


def judged(pid: str, answers: list[tuple[str, float]]) -> tuple[list[Sample], list[Verdict]]:
    """Samples of prompt `pid` with these texts, judged with these scores."""
    samples, verdicts = [], []
    for i, (text, score) in enumerate(answers):
        sid = f"{pid}#s{i}"
        samples.append(Sample(sid, pid, text, "", text, True, len(text.split()), "stop"))
        verdicts.append(Verdict(sid, pid, "ref", "ok", score, {}, f"why {i}"))
    return samples, verdicts


def run(answers_by_prompt: dict[str, list[tuple[str, float]]], **cfg):
    prompts, samples, verdicts = [], [], []
    for pid, answers in answers_by_prompt.items():
        prompts.append(Prompt(pid, "Describe the image."))
        s, v = judged(pid, answers)
        samples += s
        verdicts += v
    return build_pairs(prompts, samples, verdicts, {p.prompt_id: p.question for p in prompts}, PairsConfig(**cfg))


# One pair per prompt (chosen words, rejected words): A 10/10, B 5/10, C 12/10, D 19/20; E has identical
# texts with different scores (judge noise), F is tied (no pair).
LENGTHS = {
    "A": [(words(10, "good"), 1.0), (words(10, "bad"), 0.0)],
    "B": [(words(5, "good"), 1.0), (words(10, "bad"), 0.0)],
    "C": [(words(12, "good"), 1.0), (words(10, "bad"), 0.0)],
    "D": [(words(19, "good"), 1.0), (words(20, "bad"), 0.0)],
    "E": [(words(7), 1.0), (words(7), 0.0)],
    "F": [(words(3, "x"), 0.5), (words(4, "y"), 0.5)],
}


def test_auto_length_bound_balances_means_as_rlaifv_searches():
    # Bounds 1.00..0.96 keep A, C: |22 - 20| / 20 = 0.1. Bounds 0.94..0.52 also keep D (0.95):
    # |41 - 40| / 40 = 0.025. Bounds <= 0.50 also keep B: |46 - 50| / 50 = 0.08. The first minimum
    # is 0.94, which drops B; E is dropped as identical texts, F makes no pair.
    pairs, summary = run(LENGTHS, strategy="rlaifv")
    assert sorted(p.prompt_id for p in pairs) == ["A", "C", "D"]
    assert summary["length_filter"] == {"min_length_ratio": pytest.approx(0.94), "max_length_ratio": None}
    assert summary["skipped"] == {
        "prompts with no pair (tied or below min_margin)": 1,
        "pairs with identical texts": 1,
        "pairs outside the length-ratio bounds": 1,
    }
    # kept lengths (chosen, rejected): (10, 10), (12, 10), (19, 20)
    assert summary["length_bias"] == {
        "unit": "words",
        "chosen_mean": pytest.approx(41 / 3),
        "rejected_mean": pytest.approx(40 / 3),
        "ratio_of_means": pytest.approx(41 / 40),
        "chosen_longer_share": pytest.approx(1 / 3),
        "chosen_shorter_share": pytest.approx(1 / 3),
    }


def test_fixed_length_bounds():
    # ratios A 1.0, B 0.5, C 1.2, D 0.95: within [0.6, 1.1] are A and D
    pairs, summary = run(LENGTHS, strategy="rlaifv", min_length_ratio=0.6, max_length_ratio=1.1)
    assert sorted(p.prompt_id for p in pairs) == ["A", "D"]
    assert summary["skipped"]["pairs outside the length-ratio bounds"] == 2
    pairs, _ = run(LENGTHS, strategy="rlaifv", min_length_ratio=None)
    assert sorted(p.prompt_id for p in pairs) == ["A", "B", "C", "D"]  # no bound: only E (identical) goes


def test_gap_threshold_and_at_most_n_per_prompt():
    # scores 1.0, 0.6, 0.5, 0.0 with a gap >= 0.4: (0,1) (0,2) (0,3) (1,3) (2,3) -> 5 candidates by hand
    answers = {"p": [(words(4, f"a{i}"), s) for i, s in enumerate([1.0, 0.6, 0.5, 0.0])]}
    candidates = {("p#s0", "p#s1"), ("p#s0", "p#s2"), ("p#s0", "p#s3"), ("p#s1", "p#s3"), ("p#s2", "p#s3")}
    everything, _ = run(answers, strategy="rlaifv", min_margin=0.4, max_pairs_per_prompt=10, min_length_ratio=None)
    assert {(p.chosen_id, p.rejected_id) for p in everything} == candidates
    pairs, summary = run(answers, strategy="rlaifv", min_margin=0.4, min_length_ratio=None)  # RLAIF-V's 2
    drawn = [(p.chosen_id, p.rejected_id) for p in pairs]
    assert len(drawn) == 2 and len(set(drawn)) == 2 and set(drawn) <= candidates
    assert summary["skipped"] == {"pairs over max_pairs_per_prompt": 3}
    again, _ = run(answers, strategy="rlaifv", min_margin=0.4, min_length_ratio=None)
    assert [(p.chosen_id, p.rejected_id) for p in again] == drawn  # the same draw on a re-run
    assert all(p.margin >= 0.4 for p in pairs)


def test_length_bias_for_best_worst_and_threshold():
    # scores 0.9 (6 words), 0.5 (2 words), 0.1 (4 words)
    answers = {"q": [(words(6), 0.9), (words(2, "v"), 0.5), (words(4, "u"), 0.1)]}
    _, best_worst = run(answers, strategy="best_worst")  # one pair: 6 vs 4
    assert best_worst["length_bias"] == {
        "unit": "words", "chosen_mean": 6.0, "rejected_mean": 4.0, "ratio_of_means": 1.5,
        "chosen_longer_share": 1.0, "chosen_shorter_share": 0.0,
    }  # fmt: skip
    _, threshold = run(answers, strategy="threshold")  # 6 vs 2, 6 vs 4, 2 vs 4
    lb = threshold["length_bias"]
    assert (lb["chosen_mean"], lb["rejected_mean"]) == (pytest.approx(14 / 3), pytest.approx(10 / 3))
    assert lb["ratio_of_means"] == pytest.approx(1.4)
    assert (lb["chosen_longer_share"], lb["chosen_shorter_share"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3))
    _, none = run({"t": [(words(2), 0.5), (words(3), 0.5)]}, strategy="threshold")
    assert none["num_pairs"] == 0 and none["length_bias"]["ratio_of_means"] is None


def test_config_bounds_are_checked():
    with pytest.raises(ValidationError, match="above max_length_ratio"):
        PairsConfig(strategy="rlaifv", min_length_ratio=1.2, max_length_ratio=1.1)
    with pytest.raises(ValidationError, match="min_length_ratio must be >= 0"):
        PairsConfig(min_length_ratio=-0.1)
    with pytest.raises(ValidationError):
        PairsConfig(max_pairs_per_prompt=0)
    assert PairsConfig(min_length_ratio="auto").min_length_ratio == "auto"
