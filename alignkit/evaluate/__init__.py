"""Hallucination and correctness metrics over final answers: CHAIR, POPE and QA accuracy.

`evaluate_answers` routes each prompt by task (describe -> CHAIR, exists -> POPE, count/color ->
QA accuracy) and returns one nested JSON-serialisable dict; `format_table` and `compare` print it.
Every rate has a 95% interval beside it (`<name>_ci`: Wilson for shares of answers, a seeded
bootstrap over answers for CHAIR_i and F1), and `outcomes` keeps each answer's counts by prompt_id
so `compare` can run paired tests (McNemar, paired bootstrap; `alignkit.stats`).
Every ratio whose denominator is zero is reported as 0.0 next to its (zero) count, so callers can
tell "no hallucination" from "nothing to measure"; its interval is then [0, 1].
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from alignkit import stats
from alignkit.errors import RecordError
from alignkit.evaluate.config import EvalConfig
from alignkit.judge.reference import answers_match
from alignkit.objects import SHAPES_WORLD, Vocabulary, load_vocabulary
from alignkit.records import Prompt, Sample, read_records
from alignkit.sample.config import VllmConfig

QA_TASKS: tuple[str, ...] = ("count", "color")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b", re.IGNORECASE)
_POPE_NO_WORDS = frozenset({"No", "not", "no"})  # exactly the POPE script's list (case-sensitive)
_YES_WORD = re.compile(r"\byes\b", re.IGNORECASE)


def _ratio(num: int, den: int) -> float:
    """num / den, or 0.0 when there is nothing to divide by (the count is reported beside it)."""
    return num / den if den else 0.0


def _check_lengths(a: list, b: list, what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{what}: got {len(a)} predictions but {len(b)} references")


# ---------------------------------------------------------------------------------------------
# rates and their intervals
#
# Every rate is a ratio of sums of per-answer counts (the "rows" of a task), so one table gives
# the point value, its 95% interval and, in `compare`, its paired test. `kind` says which:
# "all": a share of all answers (Wilson interval; McNemar's test between runs),
# "some": a share of some answers, e.g. precision (Wilson interval; paired bootstrap),
# "ratio": counts that cluster within answers, e.g. CHAIR_i (bootstrap over answers; paired bootstrap).


@dataclass(frozen=True)
class Rate:
    """A rate = num / den over column sums of a task's per-answer rows."""

    num: Callable[[dict[str, np.ndarray]], np.ndarray]
    den: Callable[[dict[str, np.ndarray]], np.ndarray]
    kind: Literal["all", "some", "ratio"]

    def value(self, sums: dict[str, np.ndarray]) -> np.ndarray:
        return stats.ratio(self.num(sums), self.den(sums))


# per-answer row columns by task kind ("answers" is 1 in every row)
COLUMNS: dict[str, tuple[str, ...]] = {
    "chair": ("answers", "mentions", "hallucinated", "unique", "unique_hallucinated", "hallucinated_answer"),
    "pope": ("answers", "tp", "fp", "tn", "fn"),
    "qa": ("answers", "correct"),
    # benchmarks (alignkit.evaluate.benchmarks): AMBER's generative counts, AMBER's yes/no with
    # "no" as the positive class (as its inference.py), MMHal-Bench's 0-6 ratings
    "amber": ("answers", "nouns", "hallucinated", "truth", "covered", "hallu", "hallu_covered", "hallucinated_answer"),
    "amber_d": ("answers", "tp", "fp", "tn", "fn"),  # as "pope", with "no" as the positive class
    "mmhal": ("answers", "rating", "hallucinated"),
}
_CONFUSION = {  # rates of a yes/no confusion table (COLUMNS["pope"]), positive class first
    "accuracy": Rate(lambda c: c["tp"] + c["tn"], lambda c: c["answers"], "all"),
    "precision": Rate(lambda c: c["tp"], lambda c: c["tp"] + c["fp"], "some"),
    "recall": Rate(lambda c: c["tp"], lambda c: c["tp"] + c["fn"], "some"),
    "f1": Rate(lambda c: 2 * c["tp"], lambda c: 2 * c["tp"] + c["fp"] + c["fn"], "ratio"),
}
RATES: dict[str, dict[str, Rate]] = {
    "chair": {
        "chair_i": Rate(lambda c: c["hallucinated"], lambda c: c["mentions"], "ratio"),
        "chair_i_unique": Rate(lambda c: c["unique_hallucinated"], lambda c: c["unique"], "ratio"),
        "chair_s": Rate(lambda c: c["hallucinated_answer"], lambda c: c["answers"], "all"),
    },
    "pope": _CONFUSION | {"yes_ratio": Rate(lambda c: c["tp"] + c["fp"], lambda c: c["answers"], "all")},
    "qa": {"accuracy": Rate(lambda c: c["correct"], lambda c: c["answers"], "all")},
    "amber": {
        "chair": Rate(lambda c: c["hallucinated"], lambda c: c["nouns"], "ratio"),
        "cover": Rate(lambda c: c["covered"], lambda c: c["truth"], "ratio"),
        "hal": Rate(lambda c: c["hallucinated_answer"], lambda c: c["answers"], "all"),
        "cog": Rate(lambda c: c["hallu_covered"], lambda c: c["hallu"], "ratio"),
    },
    "amber_d": _CONFUSION,
    "mmhal": {
        "score": Rate(lambda c: c["rating"], lambda c: c["answers"], "ratio"),  # the mean rating, 0..6
        "hallucination_rate": Rate(lambda c: c["hallucinated"], lambda c: c["answers"], "all"),
    },
}
BENCHMARK_TASKS = {
    "pope_random": "pope", "pope_popular": "pope", "pope_adversarial": "pope", "amber_generative": "amber",
    "amber_discriminative": "amber_d", "amber_existence": "amber_d", "amber_attribute": "amber_d",
    "amber_relation": "amber_d", "mmhal": "mmhal",
}  # fmt: skip
TASK_KIND = {"describe": "chair", "exists": "pope", "qa": "qa", **{t: "qa" for t in QA_TASKS}, **BENCHMARK_TASKS}


def column_sums(kind: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Sums of (resampled) rows, shape (R, columns), by column name."""
    return {name: rows[:, i] for i, name in enumerate(COLUMNS[kind])}


def _statistic(kind: str, rate: Rate) -> stats.Statistic:
    return lambda sums: rate.value(column_sums(kind, sums))


def rates(kind: str, rows: list[list[int]]) -> dict:
    """Each rate of a task kind followed by its 95% interval (`<name>_ci`)."""
    arr = np.asarray(rows, dtype=float).reshape(-1, len(COLUMNS[kind]))
    sums = column_sums(kind, arr.sum(0, keepdims=True))
    out: dict = {}
    for name, rate in RATES[kind].items():
        num, den = int(rate.num(sums)[0]), int(rate.den(sums)[0])
        out[name] = _ratio(num, den)
        if rate.kind == "ratio":
            out[f"{name}_ci"] = stats.bootstrap_interval(arr, _statistic(kind, rate)) if den else [0.0, 1.0]
        else:
            out[f"{name}_ci"] = stats.wilson_interval(num, den)
    return out


# ---------------------------------------------------------------------------------------------
# CHAIR (describe)


def chair_row(answer: str, objects: list[str], vocab: Vocabulary) -> list[int]:
    """One answer's CHAIR counts, as `COLUMNS["chair"]`."""
    mentions = vocab.find(answer)
    bad = [not vocab.present(m, objects) for m in mentions]
    unique = dict(zip(mentions, bad))
    return [1, len(mentions), sum(bad), len(unique), sum(unique.values()), int(any(bad))]


def chair(answers: list[str], gold: list[list[str]], vocab: Vocabulary = SHAPES_WORLD) -> dict:
    """CHAIR_i (hallucinated / all object mentions) and CHAIR_s (answers with >= 1 hallucination).

    Follows Rohrbach et al. 2018, "Object Hallucination in Image Captioning" (EMNLP) and their
    released chair.py: `chair_i` counts every occurrence (an object named twice counts twice, the
    convention of published benchmark numbers); `chair_i_unique` counts each object once per answer.
    Synonyms and plurals fold by the vocabulary. As in the paper there is no negation handling:
    "there is no red square" mentions a red square. Each rate has a 95% interval (`_ci`).
    """
    _check_lengths(answers, gold, "chair")
    rows = [chair_row(a, g, vocab) for a, g in zip(answers, gold)]
    totals = [sum(col) for col in zip(*rows)] if rows else [0] * len(COLUMNS["chair"])
    counts = dict(zip(COLUMNS["chair"], totals))
    return rates("chair", rows) | {
        "mentions": counts["mentions"],
        "hallucinated_mentions": counts["hallucinated"],
        "unique_mentions": counts["unique"],
        "unique_hallucinated_mentions": counts["unique_hallucinated"],
        "answers": len(answers),
        "hallucinated_answers": counts["hallucinated_answer"],
    }


# ---------------------------------------------------------------------------------------------
# POPE (exists)


def pope_label(text: str) -> str:
    """Map a free-text answer to "yes"/"no" exactly as the POPE evaluation script does.

    Keep the first sentence (up to the first "."), drop commas, split on spaces: "no" if a word is
    "No", "no" or "not", otherwise "yes", so an answer with neither counts as "yes". Kept verbatim,
    quirks included ("No!" is "yes"), so numbers are comparable with published POPE results.
    """
    words = text.split(".", 1)[0].replace(",", "").split(" ")
    return "no" if _POPE_NO_WORDS.intersection(words) else "yes"


def _neither(text: str) -> bool:
    """A prediction that `pope_label` calls "yes" only by default: no yes/no word at all."""
    return pope_label(text) == "yes" and not _YES_WORD.search(text.split(".", 1)[0])


def _gold_label(label: str) -> str:
    norm = label.strip().lower()
    if norm not in ("yes", "no"):
        raise ValueError(f"pope: labels must be 'yes' or 'no', got {label!r}")
    return norm


def pope_row(prediction: str, label: str) -> list[int]:
    """One answer's confusion counts, as `COLUMNS["pope"]` (positive class "yes")."""
    pred, gold = pope_label(prediction), _gold_label(label)
    return [
        1,
        int(pred == gold == "yes"),
        int(pred == "yes" != gold),
        int(pred == gold == "no"),
        int(pred == "no" != gold),
    ]


def pope(predictions: list[str], labels: list[str]) -> dict:
    """POPE accuracy, precision/recall/F1 (positive class "yes"), yes-ratio, their 95% intervals
    (`_ci`) and confusion counts.

    Predictions are mapped by `pope_label`; `neither` counts those with no yes/no word, which the
    POPE script (Li et al. 2023) scores as "yes".
    """
    _check_lengths(predictions, labels, "pope")
    rows = [pope_row(p, g) for p, g in zip(predictions, labels)]
    tp, fp, tn, fn = (sum(r[i] for r in rows) for i in range(1, 5))
    return rates("pope", rows) | {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "neither": sum(_neither(p) for p in predictions),
        "total": len(rows),
    }


# ---------------------------------------------------------------------------------------------
# QA accuracy (count, color)


def _strip_articles(text: str) -> str:
    return _ARTICLES.sub(" ", text)


def qa_accuracy(predictions: list[str], references: list[str], task: str = "open") -> dict:
    """Share of predictions that match their reference after normalisation, with its 95% interval.

    Matching is the reference judge's `answers_match` (case, punctuation, number words -> digits,
    yes/no synonyms) with articles dropped, so evaluation and judge correctness agree: for
    task "count"/"color" the first number/colour word decides; otherwise the normalised reference
    must appear as a contiguous run of words in the prediction.
    """
    _check_lengths(predictions, references, "qa_accuracy")
    return _qa_summary([qa_row(p, r, task) for p, r in zip(predictions, references)])


def qa_row(prediction: str, reference: str, task: str) -> list[int]:
    """One answer's correctness, as `COLUMNS["qa"]`."""
    return [1, int(answers_match(_strip_articles(prediction), _strip_articles(reference), task))]


def _qa_summary(rows: list[list[int]]) -> dict:
    return rates("qa", rows) | {"correct": sum(r[1] for r in rows), "total": len(rows)}


# ---------------------------------------------------------------------------------------------
# routing by task


def _require(prompt: Prompt, value: object, what: str) -> None:
    if value is None:
        raise RecordError(f"eval prompt {prompt.prompt_id} (task {prompt.task!r}) has no {what} to score against; "
                          "eval prompts need gold annotations")


def _answers_for(prompts: list[Prompt], answers: dict[str, str]) -> list[str]:
    missing = [p.prompt_id for p in prompts if p.prompt_id not in answers]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"no answer for prompt_id {shown}")
    return [answers[p.prompt_id] for p in prompts]


def evaluate_answers(prompts: list[Prompt], answers: dict[str, str], vocab: Vocabulary = SHAPES_WORLD) -> dict:
    """Metrics per task: describe -> CHAIR (under `vocab`), exists -> POPE, count/color -> QA accuracy
    (+ "qa" overall), each rate with its 95% interval.

    Only tasks present appear; prompts of other tasks (e.g. "open") are counted under "unscored".
    `outcomes` keeps each scored answer's row (`COLUMNS`) by task and prompt_id, for paired tests.
    """
    texts = _answers_for(prompts, answers)
    by_task: dict[str, list[tuple[Prompt, str]]] = {}
    for p, a in zip(prompts, texts):
        by_task.setdefault(p.task, []).append((p, a))
    results: dict = {"num_prompts": len(prompts)}
    outcomes: dict[str, dict[str, list[int]]] = {}
    for task, items in by_task.items():
        if task == "describe":
            for p, _ in items:
                _require(p, p.objects, "gold objects")
                try:
                    [vocab.parse(o) for o in p.objects]
                except RecordError as e:
                    raise RecordError(f"eval prompt {p.prompt_id}: {e}") from None
            results[task] = chair([a for _, a in items], [p.objects for p, _ in items], vocab)
            outcomes[task] = {p.prompt_id: chair_row(a, p.objects, vocab) for p, a in items}
        elif task == "exists" or task in QA_TASKS:
            for p, _ in items:
                _require(p, p.reference_answer, "reference_answer")
                if task == "exists" and str(p.reference_answer).strip().lower() not in ("yes", "no"):
                    raise RecordError(f"eval prompt {p.prompt_id} (task 'exists'): reference_answer must be "
                                      f"'yes' or 'no', got {p.reference_answer!r}")  # fmt: skip
            row = pope_row if task == "exists" else lambda a, r, t=task: qa_row(a, r, t)
            outcomes[task] = {p.prompt_id: row(a, p.reference_answer) for p, a in items}
            rows = list(outcomes[task].values())
            results[task] = (
                pope([a for _, a in items], [p.reference_answer for p, _ in items])
                if task == "exists"
                else _qa_summary(rows)
            )
        else:
            results.setdefault("unscored", {})[task] = len(items)
    qa_rows = [r for t in QA_TASKS for r in outcomes.get(t, {}).values()]
    if qa_rows:
        results["qa"] = _qa_summary(qa_rows)
    results["outcomes"] = outcomes
    return results


# ---------------------------------------------------------------------------------------------
# tables


def _flatten(results: dict, prefix: str = "") -> dict[str, float | int]:
    """{"describe": {"chair_i": 0.1}} -> {"describe.chair_i": 0.1}, in insertion order; only numbers
    (a result's policy name, decoding, failure list, intervals and per-answer outcomes are not rows)."""
    flat: dict[str, float | int] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "outcomes":
            flat |= _flatten(value, name + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def _intervals(results: dict, prefix: str = "") -> dict[str, list[float]]:
    """{"exists": {"accuracy_ci": [lo, hi]}} -> {"exists.accuracy": [lo, hi]}."""
    out: dict[str, list[float]] = {}
    for key, value in results.items():
        if isinstance(value, dict) and key != "outcomes":
            out |= _intervals(value, f"{prefix}{key}.")
        elif key.endswith("_ci") and isinstance(value, list) and len(value) == 2:
            out[f"{prefix}{key[:-3]}"] = value
    return out


def _fmt(value: float | int | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.4f}" if signed else f"{value:.4f}"
    return f"{value:+d}" if signed else str(value)


def _fmt_ci(value: float | int | None, ci: list[float] | None, signed: bool = False) -> str:
    """A value with its 95% interval when it has one: "0.5300 [0.4100, 0.6500]"."""
    text = _fmt(value, signed)
    return f"{text} [{_fmt(ci[0], signed)}, {_fmt(ci[1], signed)}]" if ci is not None and value is not None else text


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned numbers."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def format_table(results: dict) -> str:
    """A plain-text table of `evaluate_answers` output, one metric per row, rates with their 95% interval."""
    cis = _intervals(results)
    return _table(["metric", "value"], [[k, _fmt_ci(v, cis.get(k))] for k, v in _flatten(results).items()])


def _rows_by_task(results: dict) -> dict[str, dict[str, list[int]]]:
    """Per-answer rows by task from a results' `outcomes`, with "qa" = count + color."""
    outcomes = results.get("outcomes") or {}
    if not isinstance(outcomes, dict):
        raise RecordError("outcomes: expected a mapping of task -> {prompt_id: counts}")
    by_task = {t: rows for t, rows in outcomes.items() if t in TASK_KIND}
    for task, rows in by_task.items():
        columns = COLUMNS[TASK_KIND[task]]
        if not isinstance(rows, dict):
            raise RecordError(f"outcomes.{task}: expected a mapping of prompt_id -> counts")
        for pid, row in rows.items():
            if not (isinstance(row, list) and len(row) == len(columns) and all(isinstance(x, int) for x in row)):
                raise RecordError(
                    f"outcomes.{task}.{pid}: expected {len(columns)} counts ({', '.join(columns)}), got {row!r}"
                )
    qa = {pid: row for t in QA_TASKS for pid, row in outcomes.get(t, {}).items()}
    return by_task | ({"qa": qa} if qa else {})


def paired_tests(before: dict, after: dict) -> dict[str, dict]:
    """Paired tests of every rate both results have per-answer outcomes for, keyed "task.metric".

    Questions pair by prompt_id and must be the same in both. McNemar's exact test for shares of
    all answers (accuracy, CHAIR_s, yes-ratio), a paired bootstrap over questions otherwise
    (CHAIR_i, precision, recall, F1). Each gives `diff` (after - before), `p`, `significant` (at
    0.05) and, for the bootstrap, `ci` of the difference.
    """
    a_rows, b_rows = _rows_by_task(before), _rows_by_task(after)
    out: dict[str, dict] = {}
    for task in sorted(a_rows.keys() & b_rows.keys()):
        a, b = a_rows[task], b_rows[task]
        if a.keys() != b.keys():
            only = sorted(a.keys() ^ b.keys())
            raise RecordError(f"{task}: the two evaluations answered different questions (prompt_id "
                              f"{', '.join(only[:5])}{' ...' if len(only) > 5 else ''} in one only); "
                              "paired tests need the same questions")  # fmt: skip
        ids = sorted(a)
        if not ids:
            continue
        kind = TASK_KIND[task]
        ra, rb = np.asarray([a[i] for i in ids], dtype=float), np.asarray([b[i] for i in ids], dtype=float)
        for name, rate in RATES[kind].items():
            if rate.kind == "all":  # each answer is 0/1 in num and counted in den: per-row num is its outcome
                correct_a, correct_b = (rate.num(column_sums(kind, r)).astype(bool).tolist() for r in (ra, rb))
                out[f"{task}.{name}"] = stats.mcnemar_exact(correct_a, correct_b)
            else:
                out[f"{task}.{name}"] = stats.paired_bootstrap(ra, rb, _statistic(kind, rate))
    return out


def compare(before: dict, after: dict) -> str:
    """A plain-text side-by-side table of two results with after - before deltas ("-" if missing).

    When both hold per-answer outcomes, tested rates also show the p-value (and the bootstrap
    interval of the difference), and "n.s." marks a difference not significant at 0.05.
    """
    b, a = _flatten(before), _flatten(after)
    tests = paired_tests(before, after)
    rows = []
    for key in dict.fromkeys([*b, *a]):
        old, new = b.get(key), a.get(key)
        delta = new - old if old is not None and new is not None else None
        row = [key, _fmt(old), _fmt(new), _fmt_ci(delta, tests.get(key, {}).get("ci"), signed=True)]
        if tests:
            test = tests.get(key)
            p = "p<0.001" if test and test["p"] < 0.001 else f"p={test['p']:.3f}" if test else ""
            row += [p, "" if not test or test["significant"] else "n.s."]
        rows.append(row)
    header = ["metric", "before", "after", "delta"] + (["p", "sig"] if tests else [])
    return _table(header, rows)


def headline(before: dict, after: dict) -> str:
    """The paired-tested rates only, each before and after with its 95% interval, and the paired
    test's p ("n.s.": not significant at 0.05): the short table a run ends with, within 80 columns
    for the shapes world's metrics (`compare` has every metric and the change's interval)."""
    tests = paired_tests(before, after)
    b, a, b_ci, a_ci = _flatten(before), _flatten(after), _intervals(before), _intervals(after)
    rows = [[key, f"{b[key]:.3f} [{b_ci[key][0]:.3f}, {b_ci[key][1]:.3f}]",
             f"{a[key]:.3f} [{a_ci[key][0]:.3f}, {a_ci[key][1]:.3f}]",
             ("<0.001" if test["p"] < 0.001 else f"{test['p']:.3f}") + ("" if test["significant"] else " n.s.")]
            for key, test in tests.items() if key in b and key in a and key in b_ci and key in a_ci]  # fmt: skip
    return _table(["metric", "before [95% CI]", "after [95% CI]", "p"], rows) if rows else ""


def run_eval(
    prompts: list[Prompt],
    out_dir: Path,
    cfg: EvalConfig,
    *,
    fingerprint: str,
    model: str,
    adapter: str | None = None,
    template: str = "cot",
    seed: int = 0,
    vllm: VllmConfig | None = None,
) -> dict:
    """Answer every prompt once with a policy (greedy unless `cfg.temperature` > 0) and score the answers.

    Writes `out_dir/answers.jsonl` (Sample records, resumable) and returns `evaluate_answers`'
    results (CHAIR under `cfg.vocabulary`), or for `cfg.benchmark` its metrics (`benchmarks.score`), plus the policy and decoding used; the caller adds a judge score if it has one.
    `vllm` is the engine's settings for `cfg.backend: vllm` (the recipe's `sample.vllm`).
    """
    from alignkit.evaluate import benchmarks
    from alignkit.sample import make_backend, sample_prompts

    vocab = load_vocabulary(cfg.vocabulary)  # a bad vocabulary file fails before any sampling
    engine = make_backend(
        cfg.backend, model, adapter, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        batch_size=cfg.batch_size, vllm_options=vllm.model_dump(exclude_none=True) if vllm else None,
    )  # fmt: skip
    answers_path = Path(out_dir) / "answers.jsonl"
    summary = sample_prompts(
        engine, prompts, answers_path, fingerprint=fingerprint, template=template, num_samples=1, seed=seed
    )
    answers = {s.prompt_id: s.answer for s in read_records(answers_path, Sample)}
    scored = [p for p in prompts if p.prompt_id in answers]  # prompts whose image failed are listed below
    if cfg.benchmark == "prompts":
        results = evaluate_answers(scored, answers, vocab)
    else:
        results = {"benchmark": cfg.benchmark} | benchmarks.score(cfg, scored, answers)
    results["policy"] = engine.policy
    results["decoding"] = "greedy" if cfg.temperature == 0 else f"sampling (temperature {cfg.temperature})"
    results["failed_prompts"] = summary["failed"]
    results["truncated"] = summary["truncated"]
    return results
