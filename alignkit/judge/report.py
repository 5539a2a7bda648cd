"""The judge quality report (judge_report.json): can these verdicts be trusted as preference signal?

- scores: the distribution of the combined score and of each criterion (a judge that gives
  everything the same score gives no preference signal);
- self_consistency (num_judgments > 1): how far repeated judgments of one sample drift apart;
- position (pairwise): how often both orders of a pair agree, and how often the judge picks
  the first position when it picks one (0.5 is unbiased);
- reference_agreement (prompts with gold annotations): Spearman correlation with the reference
  judge's scores, and, within each prompt, the share of sample pairs the reference ranks that
  the judge ranks the same way (judge ties count half) -- what the pairs stage depends on.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from alignkit.records import Verdict, write_atomic

HISTOGRAM_BINS = 5


def distribution(values: list[float]) -> dict[str, Any]:
    """n, mean, std, min, quartiles, max, and counts in equal bins over [0, 1]."""
    if not values:
        return {"n": 0}
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    bins = [0] * HISTOGRAM_BINS
    for v in values:
        bins[min(int(v * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values),
        "min": min(values),
        "p25": q[0],
        "median": q[1],
        "p75": q[2],
        "max": max(values),
        "histogram": bins,
    }


def score_distributions(verdicts: list[dict[str, Any]]) -> dict[str, Any]:
    """The distribution of `score` and of each criterion over the ok verdicts."""
    ok = [v for v in verdicts if v["status"] == "ok"]
    out = {"score": distribution([v["score"] for v in ok])}
    for name in dict.fromkeys(k for v in ok for k in v["scores"]):
        out[name] = distribution([v["scores"][name] for v in ok if name in v["scores"]])
    return out


def _mean_abs_diff(values: list[float]) -> float:
    return statistics.fmean(abs(a - b) for a, b in itertools.combinations(values, 2))


def self_consistency(verdicts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Agreement between repeated judgments of each sample (None without repetitions)."""
    repeated = [[j for j in v.get("judgments", []) if "score" in j] for v in verdicts]
    repeated = [js for js in repeated if len(js) > 1]
    if not repeated:
        return None
    names = dict.fromkeys(k for js in repeated for k in js[0]["scores"])
    return {
        "samples": len(repeated),
        "mean_abs_diff": statistics.fmean(_mean_abs_diff([j["score"] for j in js]) for js in repeated),
        "exact_agreement": sum(len({j["score"] for j in js}) == 1 for js in repeated) / len(repeated),
        "per_criterion_mean_abs_diff": {
            n: statistics.fmean(_mean_abs_diff([j["scores"][n] for j in js]) for js in repeated) for n in names
        },
    }


def position_consistency(comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    """Share of decided pairs whose two orders agree, and the judge's first-position rate."""
    decided = [c for c in comparisons if c["winner"] is not None]
    positions = [o["position"] for c in comparisons for o in c["orders"] if o["position"] in ("A", "B")]
    return {
        "comparisons": len(comparisons),
        "decided": len(decided),
        "consistency": sum(c["consistent"] for c in decided) / len(decided) if decided else None,
        "ties": sum(c["winner"] == "tie" for c in decided),
        "first_position_rate": positions.count("A") / len(positions) if positions else None,
    }


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None when undefined."""
    if len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / norm if norm else None


def reference_agreement(verdicts: list[dict[str, Any]], reference: list[Verdict]) -> dict[str, Any] | None:
    """Agreement of the judge's ok scores with the reference judge's ok scores on the same samples."""
    ref = {v.sample_id: v for v in reference if v.status == "ok"}
    both = [(v, ref[v["sample_id"]]) for v in verdicts if v["status"] == "ok" and v["sample_id"] in ref]
    if not both:
        return None
    by_prompt: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for v, r in both:
        by_prompt[v["prompt_id"]].append((v["score"], r.score))
    ranked = agreed = 0.0
    for scored in by_prompt.values():
        for (j1, r1), (j2, r2) in itertools.combinations(scored, 2):
            if r1 != r2:
                ranked += 1
                agreed += 0.5 if j1 == j2 else float((j1 > j2) == (r1 > r2))
    shared = [n for n in both[0][1].scores if all(n in v["scores"] for v, _ in both)]
    return {
        "samples": len(both),
        "spearman": spearman([v["score"] for v, _ in both], [r.score for _, r in both]),
        "pairs_ranked_by_reference": int(ranked),
        "pairwise_agreement": agreed / ranked if ranked else None,
        "per_criterion_spearman": {
            n: spearman([v["scores"][n] for v, _ in both], [r.scores[n] for _, r in both]) for n in shared
        },
    }


def quality_report(
    verdicts: list[dict[str, Any]],
    *,
    comparisons: list[dict[str, Any]] | None = None,
    reference: list[Verdict] | None = None,
) -> dict[str, Any]:
    """The whole report; sections that do not apply are None."""
    return {
        "verdicts": {"total": len(verdicts), "ok": sum(v["status"] == "ok" for v in verdicts)},
        "scores": score_distributions(verdicts),
        "self_consistency": self_consistency(verdicts),
        "position": position_consistency(comparisons) if comparisons is not None else None,
        "reference_agreement": reference_agreement(verdicts, reference) if reference else None,
    }


def format_report(report: dict[str, Any]) -> str:
    """A few readable lines for the terminal (the JSON file has everything)."""

    def num(x: Any) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lines = [f"judge quality report: {report['verdicts']['ok']} of {report['verdicts']['total']} verdicts ok"]
    for name, d in report["scores"].items():
        if d["n"]:
            lines.append(
                f"  {name:<14} mean {num(d['mean'])}  std {num(d['std'])}  min {num(d['min'])}  "
                f"median {num(d['median'])}  max {num(d['max'])}  histogram {d['histogram']}"
            )
    if sc := report["self_consistency"]:
        lines.append(
            f"  self-consistency over {sc['samples']} samples: mean |diff| {num(sc['mean_abs_diff'])}, "
            f"all judgments equal {num(sc['exact_agreement'])}"
        )
    if pos := report["position"]:
        lines.append(
            f"  position consistency {num(pos['consistency'])} over {pos['decided']} pairs "
            f"({pos['ties']} ties); first position picked {num(pos['first_position_rate'])}"
        )
    if ra := report["reference_agreement"]:
        lines.append(
            f"  agreement with the reference judge on {ra['samples']} samples: Spearman {num(ra['spearman'])}, "
            f"pairwise {num(ra['pairwise_agreement'])} over {ra['pairs_ranked_by_reference']} pairs"
        )
    return "\n".join(lines)


def write_report(path: Path, report: dict[str, Any]) -> Path:
    """Write the report as JSON atomically (a temporary name, then a rename)."""
    write_atomic(path, json.dumps(report, indent=2) + "\n")
    return path
