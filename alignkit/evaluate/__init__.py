"""Hallucination and correctness metrics over final answers: CHAIR, POPE and QA accuracy.

`evaluate_answers` routes each prompt by task (describe -> CHAIR, exists -> POPE, count/color ->
QA accuracy) and returns one nested JSON-serialisable dict; `format_table` and `compare` print it.
Every ratio whose denominator is zero is reported as 0.0 next to its (zero) count, so callers can
tell "no hallucination" from "nothing to measure".
"""

from __future__ import annotations

import re
from pathlib import Path

from alignkit.errors import RecordError
from alignkit.evaluate.config import EvalConfig
from alignkit.judge.reference import answers_match
from alignkit.objects import find_mentions, is_present, parse_object
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
# CHAIR (describe)


def chair(answers: list[str], gold: list[list[str]]) -> dict:
    """CHAIR_i (hallucinated / all object mentions) and CHAIR_s (answers with >= 1 hallucination).

    Follows Rohrbach et al. 2018, "Object Hallucination in Image Captioning" (EMNLP): CHAIR_i is
    |{hallucinated objects}| / |{all objects mentioned}|, so an object named twice in one answer
    counts once (unique canonical mentions per answer, after plurals/synonyms are folded by
    `find_mentions`; the authors' released chair.py counts every occurrence instead). As in the
    paper there is no negation handling: "there is no red square" mentions a red square.
    """
    _check_lengths(answers, gold, "chair")
    mentions = hallucinated = hallucinated_answers = 0
    for answer, objects in zip(answers, gold):
        unique = set(find_mentions(answer))
        bad = sum(not is_present(m, objects) for m in unique)
        mentions += len(unique)
        hallucinated += bad
        hallucinated_answers += bad > 0
    return {
        "chair_i": _ratio(hallucinated, mentions),
        "chair_s": _ratio(hallucinated_answers, len(answers)),
        "mentions": mentions,
        "hallucinated_mentions": hallucinated,
        "answers": len(answers),
        "hallucinated_answers": hallucinated_answers,
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


def pope(predictions: list[str], labels: list[str]) -> dict:
    """POPE accuracy, precision/recall/F1 (positive class "yes"), yes-ratio and confusion counts.

    Predictions are mapped by `pope_label`; `neither` counts those with no yes/no word, which the
    POPE script (Li et al. 2023) scores as "yes".
    """
    _check_lengths(predictions, labels, "pope")
    pred = [pope_label(p) for p in predictions]
    gold = [_gold_label(g) for g in labels]
    pairs = list(zip(pred, gold))
    tp, fp = pairs.count(("yes", "yes")), pairs.count(("yes", "no"))
    tn, fn = pairs.count(("no", "no")), pairs.count(("no", "yes"))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, len(pairs)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, len(pairs)),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "neither": sum(_neither(p) for p in predictions),
        "total": len(pairs),
    }


# ---------------------------------------------------------------------------------------------
# QA accuracy (count, color)


def _strip_articles(text: str) -> str:
    return _ARTICLES.sub(" ", text)


def qa_accuracy(predictions: list[str], references: list[str], task: str = "open") -> dict:
    """Share of predictions that match their reference after normalisation.

    Matching is the reference judge's `answers_match` (case, punctuation, number words -> digits,
    yes/no synonyms) with articles dropped, so evaluation and judge correctness agree: for
    task "count"/"color" the first number/colour word decides; otherwise the normalised reference
    must appear as a contiguous run of words in the prediction.
    """
    _check_lengths(predictions, references, "qa_accuracy")
    correct = sum(
        answers_match(_strip_articles(p), _strip_articles(r), task) for p, r in zip(predictions, references)
    )
    return {"accuracy": _ratio(correct, len(predictions)), "correct": correct, "total": len(predictions)}


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


def evaluate_answers(prompts: list[Prompt], answers: dict[str, str]) -> dict:
    """Metrics per task: describe -> CHAIR, exists -> POPE, count/color -> QA accuracy (+ "qa" overall).

    Only tasks present appear; prompts of other tasks (e.g. "open") are counted under "unscored".
    """
    texts = _answers_for(prompts, answers)
    by_task: dict[str, list[tuple[Prompt, str]]] = {}
    for p, a in zip(prompts, texts):
        by_task.setdefault(p.task, []).append((p, a))
    results: dict = {"num_prompts": len(prompts)}
    for task, items in by_task.items():
        ps, ans = [p for p, _ in items], [a for _, a in items]
        if task == "describe":
            for p in ps:
                _require(p, p.objects, "gold objects")
                try:
                    [parse_object(o) for o in p.objects]
                except RecordError as e:
                    raise RecordError(f"eval prompt {p.prompt_id}: {e}") from None
            results[task] = chair(ans, [p.objects for p in ps])
        elif task == "exists" or task in QA_TASKS:
            for p in ps:
                _require(p, p.reference_answer, "reference_answer")
                if task == "exists" and str(p.reference_answer).strip().lower() not in ("yes", "no"):
                    raise RecordError(f"eval prompt {p.prompt_id} (task 'exists'): reference_answer must be "
                                      f"'yes' or 'no', got {p.reference_answer!r}")  # fmt: skip
            refs = [p.reference_answer for p in ps]
            results[task] = pope(ans, refs) if task == "exists" else qa_accuracy(ans, refs, task)
        else:
            results.setdefault("unscored", {})[task] = len(items)
    qa = [results[t] for t in QA_TASKS if t in results]
    if qa:
        correct, total = sum(r["correct"] for r in qa), sum(r["total"] for r in qa)
        results["qa"] = {"accuracy": _ratio(correct, total), "correct": correct, "total": total}
    return results


# ---------------------------------------------------------------------------------------------
# tables


def _flatten(results: dict, prefix: str = "") -> dict[str, float | int]:
    """{"describe": {"chair_i": 0.1}} -> {"describe.chair_i": 0.1}, in insertion order; only numbers
    (a result's policy name, decoding and failure list are context, not metrics)."""
    flat: dict[str, float | int] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flatten(value, name + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def _fmt(value: float | int | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.4f}" if signed else f"{value:.4f}"
    return f"{value:+d}" if signed else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned numbers."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def format_table(results: dict) -> str:
    """A plain-text table of `evaluate_answers` output, one metric per row."""
    return _table(["metric", "value"], [[k, _fmt(v)] for k, v in _flatten(results).items()])


def compare(before: dict, after: dict) -> str:
    """A plain-text side-by-side table of two results with after - before deltas ("-" if missing)."""
    b, a = _flatten(before), _flatten(after)
    rows = []
    for key in dict.fromkeys([*b, *a]):
        old, new = b.get(key), a.get(key)
        delta = new - old if old is not None and new is not None else None
        rows.append([key, _fmt(old), _fmt(new), _fmt(delta, signed=True)])
    return _table(["metric", "before", "after", "delta"], rows)


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
    results plus the policy and decoding used; the caller adds a judge score if it has one.
    `vllm` is the engine's settings for `cfg.backend: vllm` (the recipe's `sample.vllm`).
    """
    from alignkit.sample import make_backend, sample_prompts

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
    results = evaluate_answers(scored, answers)
    results["policy"] = engine.policy
    results["decoding"] = "greedy" if cfg.temperature == 0 else f"sampling (temperature {cfg.temperature})"
    results["failed_prompts"] = summary["failed"]
    results["truncated"] = summary["truncated"]
    return results
