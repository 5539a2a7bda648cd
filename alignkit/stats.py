"""Uncertainty for evaluation figures: 95% intervals and paired tests.

- `wilson_interval`: the Wilson score interval for a proportion (Wilson 1927), good at small n and
  near 0 or 1, where the normal approximation is not.
- `bootstrap_interval` / `paired_bootstrap`: percentile bootstrap over answers for statistics that
  are functions of per-answer count sums (CHAIR_i = hallucinated / mentions, F1, ...), seeded so a
  results file is reproducible.
- `mcnemar_exact`: McNemar's exact test for two systems' per-question correctness on the same
  questions (a two-sided binomial test on the discordant pairs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal
RESAMPLES = 2000
_CHUNK = 250  # resamples drawn at once (bounds memory at _CHUNK x answers)

Statistic = Callable[[np.ndarray], np.ndarray]
"""Maps column sums of per-answer counts, shape (resamples, columns), to one value per resample."""


def wilson_interval(successes: int, n: int, z: float = Z95) -> list[float]:
    """The Wilson score interval [low, high] for `successes` out of `n`; [0, 1] when n is 0."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 0 where den is 0 (as the point estimates report it)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def _resampled_sums(rows_list: list[np.ndarray], resamples: int, seed: int):
    """Yield, chunk by chunk, the column sums of each rows array under the same resampled answers."""
    n = len(rows_list[0])
    rng = np.random.default_rng(seed)
    done = 0
    while done < resamples:
        size = min(_CHUNK, resamples - done)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(float)
        yield [weights @ rows for rows in rows_list]
        done += size


def _percentiles(values: np.ndarray, level: float) -> list[float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def bootstrap_interval(
    rows: np.ndarray | list, statistic: Statistic, *, resamples: int = RESAMPLES, seed: int = 0, level: float = 0.95
) -> list[float]:
    """Percentile bootstrap interval of `statistic` over answers (the rows of per-answer counts)."""
    rows = np.asarray(rows, dtype=float)
    if len(rows) == 0:
        return [0.0, 1.0]
    values = np.concatenate([statistic(s) for (s,) in _resampled_sums([rows], resamples, seed)])
    return _percentiles(values, level)


def paired_bootstrap(
    rows_a: np.ndarray | list,
    rows_b: np.ndarray | list,
    statistic: Statistic,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Interval and two-sided p-value of statistic(B) - statistic(A), resampling the same questions.

    Row i of both arrays is the same question. The p-value is twice the smaller share of resampled
    differences on either side of 0 (capped at 1); "significant" means the interval excludes 0.
    """
    a, b = np.asarray(rows_a, dtype=float), np.asarray(rows_b, dtype=float)
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap: {len(a)} rows against {len(b)}; rows must be the same questions")
    if len(a) == 0:
        return {"diff": 0.0, "ci": [0.0, 0.0], "p": 1.0, "significant": False}
    diffs = np.concatenate([statistic(sb) - statistic(sa) for sa, sb in _resampled_sums([a, b], resamples, seed)])
    point = float(statistic(b.sum(0, keepdims=True))[0] - statistic(a.sum(0, keepdims=True))[0])
    ci = _percentiles(diffs, level)
    p = min(1.0, 2 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0))))
    return {"diff": point, "ci": ci, "p": p, "significant": not ci[0] <= 0.0 <= ci[1]}


def mcnemar_exact(a_correct: list[bool], b_correct: list[bool]) -> dict:
    """McNemar's exact test on paired correctness: p = P(X <= min(n01, n10)) * 2 for X ~ Bin(n01 + n10, 1/2).

    `n01` counts questions A got wrong and B right, `n10` the reverse; p is 1 when they never disagree.
    """
    if len(a_correct) != len(b_correct):
        raise ValueError(f"mcnemar_exact: {len(a_correct)} answers against {len(b_correct)}")
    n01 = sum(not a and b for a, b in zip(a_correct, b_correct))
    n10 = sum(a and not b for a, b in zip(a_correct, b_correct))
    n = n01 + n10
    tail = sum(math.comb(n, k) for k in range(min(n01, n10) + 1)) / 2**n
    p = min(1.0, 2 * tail)
    diff = (n01 - n10) / len(a_correct) if a_correct else 0.0
    return {"diff": diff, "n01": n01, "n10": n10, "p": p, "significant": p < 0.05}
