"""Intervals and paired tests against hand computations and scipy: Wilson, bootstrap, McNemar."""

import math

import numpy as np
import pytest

from alignkit.evaluate import pope, qa_accuracy
from alignkit.stats import Z95, bootstrap_interval, mcnemar_exact, paired_bootstrap, ratio, wilson_interval


def _wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    """Wilson (1927): (p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z = 1.96."""
    z, p = 1.959963984540054, k / n
    centre, half = p + z**2 / (2 * n), z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return (centre - half) / (1 + z**2 / n), (centre + half) / (1 + z**2 / n)


def test_z95_is_the_normal_quantile():
    assert 0.5 * math.erfc(-Z95 / math.sqrt(2)) == pytest.approx(0.975, abs=1e-12)


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (8, 10, 0.4902, 0.9433),  # statsmodels proportion_confint(8, 10, method="wilson")
    (0, 10, 0.0, 0.2775),  # 0 of 10: upper bound z^2 / (n + z^2)
])  # fmt: skip
def test_wilson_matches_the_formula_and_published_values(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx(list(_wilson_by_hand(k, n)), abs=1e-12)
    assert got == pytest.approx([low, high], abs=5e-5)


def test_wilson_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(1, 3), (17, 40), (99, 100)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx([ci.low, ci.high], abs=1e-9)


def test_wilson_with_nothing_measured_is_the_whole_range():
    assert wilson_interval(0, 0) == [0.0, 1.0]


def _mean(sums: np.ndarray) -> np.ndarray:
    return ratio(sums[:, 1], sums[:, 0])


def test_bootstrap_of_a_proportion_is_near_wilson_and_seeded():
    rows = [[1, 1]] * 300 + [[1, 0]] * 700  # 30% of 1000 answers
    boot = bootstrap_interval(rows, _mean, seed=3)
    assert boot == bootstrap_interval(rows, _mean, seed=3)  # reproducible
    assert boot != bootstrap_interval(rows, _mean, seed=4)
    assert boot == pytest.approx(wilson_interval(300, 1000), abs=0.01)  # both about 0.30 +- 0.028


def test_bootstrap_of_a_ratio_resamples_answers_not_mentions():
    # CHAIR_i-like: one answer holds all 10 hallucinated mentions of 20; resampling answers spreads it
    rows = [[1, 10, 10]] + [[1, 1, 0]] * 10
    ci = bootstrap_interval(rows, lambda s: ratio(s[:, 2], s[:, 1]))
    assert ci[0] == 0.0 and 0.5 < ci[1] <= 10 / 11  # 10/20 = 0.5 lies inside a wide interval
    assert bootstrap_interval([[1, 2, 1]] * 5, lambda s: ratio(s[:, 2], s[:, 1])) == [0.5, 0.5]


def test_mcnemar_matches_the_binomial_tail_by_hand():
    # 6 questions only B gets right, 1 only A: p = 2 * P(X <= 1), X ~ Bin(7, 1/2) = 2 * 8/128
    a = [True] * 10 + [False] * 6 + [True] + [False] * 3
    b = [True] * 10 + [True] * 6 + [False] + [False] * 3
    out = mcnemar_exact(a, b)
    assert (out["n01"], out["n10"]) == (6, 1)
    assert out["p"] == pytest.approx(2 * 8 / 128)
    assert out["diff"] == pytest.approx(5 / 20) and not out["significant"]
    assert mcnemar_exact([False] * 6, [True] * 6)["p"] == pytest.approx(2 / 64)  # 0 vs 6: significant
    assert mcnemar_exact([True, False], [True, False]) == {
        "diff": 0.0,
        "n01": 0,
        "n10": 0,
        "p": 1.0,
        "significant": False,
    }


def test_mcnemar_matches_scipy_binomtest():
    stats = pytest.importorskip("scipy.stats")
    a = [True] * 9 + [False] * 21
    b = [False] * 3 + [True] * 6 + [True] * 14 + [False] * 7  # n10 = 3, n01 = 14
    out = mcnemar_exact(a, b)
    assert (out["n01"], out["n10"]) == (14, 3)
    assert out["p"] == pytest.approx(stats.binomtest(3, 17, 0.5).pvalue)


def test_paired_bootstrap_identical_runs_show_no_difference():
    rows = [[1, 3, 1], [1, 2, 0], [1, 4, 2], [1, 1, 1]]
    out = paired_bootstrap(rows, rows, lambda s: ratio(s[:, 2], s[:, 1]))
    assert out == {"diff": 0.0, "ci": [0.0, 0.0], "p": 1.0, "significant": False}


def test_paired_bootstrap_flags_a_clear_difference_and_not_noise():
    stat = lambda s: ratio(s[:, 2], s[:, 1])  # noqa: E731
    before = [[1, 4, 2]] * 40  # CHAIR_i 0.5
    after = [[1, 4, 0]] * 40  # CHAIR_i 0
    out = paired_bootstrap(before, after, stat)
    assert out["diff"] == -0.5 and out["ci"] == [-0.5, -0.5] and out["significant"] and out["p"] == 0.0
    # one answer in 40 changes: the interval straddles 0
    noisy = paired_bootstrap(before, [[1, 4, 1]] + before[1:], stat)
    assert (
        noisy["diff"] == pytest.approx(-1 / 160) and not noisy["significant"] and noisy["ci"][0] < 0 <= noisy["ci"][1]
    )


def test_every_rate_of_a_metric_has_its_interval():
    out = pope(["yes", "no", "yes", "yes"], ["yes", "no", "no", "yes"])
    for name in ("accuracy", "precision", "recall", "yes_ratio"):
        assert out[f"{name}_ci"][0] <= out[name] <= out[f"{name}_ci"][1]
    assert out["accuracy_ci"] == pytest.approx(wilson_interval(3, 4))
    assert out["precision_ci"] == pytest.approx(wilson_interval(2, 3))  # tp of predicted yes
    assert out["f1_ci"][0] <= out["f1"] <= out["f1_ci"][1]
    assert qa_accuracy(["2", "3"], ["2", "2"], "count")["accuracy_ci"] == pytest.approx(wilson_interval(1, 2))
