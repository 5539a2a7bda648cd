"""Judge calibration: the recipe's judge on labelled preference data, before a run pays for it.

`alignkit judge-eval RECIPE --labels FILE` (and the `judge.min_accuracy` gate of `alignkit run`)
judges every labelled record's two answers with the recipe's `judge` section, through the same
client, verdict cache, rate caps and spending caps as the judge stage, and compares the judge's
preference with the label.

A labelled file is jsonl, a JSON array or parquet (`alignkit.records.iter_rows`); each record has
`image` or `images` (paths relative to the file, or embedded), `question` and one of:
- `answer_a`, `answer_b` and `label` (`a`, `b` or `tie`); optionally `response_a` / `response_b`,
  the full responses with their reasoning (default: the answers);
- `chosen` and `rejected` (text or conversations, as RLAIF-V and TRL rows and alignkit's own
  pairs.jsonl hold them; the question may come from a `prompt` conversation instead): `chosen` is
  answer a, and the label is `a` unless a `label` column says `a`/`chosen`, `b`/`rejected` or `tie`.
  The final answer is read from the text with the recipe's `sample.template`.
Optional: `id` (or `pair_id`), and the gold annotations the reference judge reads (`objects`,
`task`, `reference_answer`) for the agreement figure.

A pointwise judge (a `single` judge file, or the reference judge) scores each answer alone; its
preference is the higher score, a tie when the scores are equal. A pairwise judge is asked both
orders, and prefers an answer only when both orders name it (as the judge stage does).

Figures: accuracy (the preference equals the label; a tie preference on an a/b label is wrong)
with a 95% Wilson interval over the records that got a verdict; tie rate (ties among those
verdicts); position consistency (pairwise: the share of records whose two orders named the same
answer, or both a tie; a pointwise judge sees one answer per request, so order cannot change its
verdict and the figure is null); agreement with the reference judge on the records with gold
annotations (null when the judge is the reference judge); requests and cost per 1,000 verdicts,
measured over the judgments this run sent (cached ones cost nothing now, so they are left out).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.errors import RecordError, StageIncomplete
from alignkit.judge.cache import VerdictCache
from alignkit.judge.config import JudgeConfig
from alignkit.judge.progress import Tally
from alignkit.judge.reference import judge_reference, reference_verdicts
from alignkit.judge.rubric import Rubric, load_rubric
from alignkit.objects import load_vocabulary
from alignkit.records import Prompt, Sample, image_files, iter_rows, to_dict, write_atomic
from alignkit.sample.templates import Template, load_template
from alignkit.stats import wilson_interval

LABELS = {"a": "a", "b": "b", "tie": "tie", "chosen": "a", "rejected": "b"}
TASKS = ("describe", "count", "exists", "color", "open")


@dataclass(frozen=True)
class Labelled:
    """One labelled record: a prompt, its two answers as samples (`<id>#a`, `<id>#b`) and the label."""

    prompt: Prompt
    a: Sample
    b: Sample
    label: str  # a | b | tie


def read_labels(
    path: str | Path, image_dir: str | Path, template: str = "cot", allow_outside_paths: bool = False
) -> list[Labelled]:
    """The records of a labelled file (see the module docstring); a bad record is an error naming
    the file, the line (or row) and the key."""
    path, tmpl = Path(path), load_template(template)
    base, rows = iter_rows(path, "labels")
    out: list[Labelled] = []
    seen: set[str] = set()
    for i, (where, row) in enumerate(rows):
        rid = str(row.get("id") or row.get("pair_id") or i)
        if rid in seen:
            raise RecordError(f"{where}: id: duplicate record id {rid!r}")
        seen.add(rid)
        out.append(_labelled(row, rid, where, base, Path(image_dir), tmpl, allow_outside_paths))
    if not out:
        raise RecordError(f"{path}: no labelled records in it")
    return out


def _labelled(
    row: dict[str, Any], rid: str, where: str, base: Path, image_dir: Path, tmpl: Template, outside: bool
) -> Labelled:
    from alignkit.data.formats import _first_exchange, _text, _turns

    def text(key: str) -> str:
        value = row.get(key)
        if isinstance(value, list):  # a conversation: its assistant turns
            value = "\n".join(t for role, t in _turns(value, f"{where}: {key}") if role == "assistant")
        if not isinstance(value, str) or not value.strip():
            raise RecordError(f"{where}: {key}: expected a non-empty string, got {value!r}")
        return value.strip()

    if "answer_a" in row or "answer_b" in row:
        answers = []
        for s in "ab":
            answer = text(f"answer_{s}")
            answers.append((answer, text(f"response_{s}") if row.get(f"response_{s}") is not None else answer))
        label = row.get("label")
        if label is None:
            raise RecordError(f"{where}: label: required key missing (a, b or tie)")
    elif "chosen" in row and "rejected" in row:
        answers = []
        for k in ("chosen", "rejected"):
            full = text(k)
            _, answer, parsed = tmpl.parse(full)
            answers.append((answer if parsed else full, full))
        label = row["label"] if row.get("label") is not None else "a"
    else:
        raise RecordError(f"{where}: a labelled record needs answer_a, answer_b and label, or chosen and rejected "
                          f"(its keys: {sorted(row)})")  # fmt: skip
    if not isinstance(label, str) or label.strip().lower() not in LABELS:
        raise RecordError(f"{where}: label: {label!r} is not one of a, b, tie (or chosen, rejected)")
    question = row.get("question")
    if question is None and row.get("prompt") is not None:  # a TRL / pairs.jsonl row: the user turn
        prompt = row["prompt"]
        question = prompt if isinstance(prompt, str) else _first_exchange(_turns(prompt, f"{where}: prompt"), where)[0]
        question = _text(question, f"{where}: prompt")
        if tmpl.instruction and question.endswith(tmpl.instruction):  # as the policy saw it: template removed
            question = question[: -len(tmpl.instruction)].strip()
    if not isinstance(question, str) or not question.strip():
        raise RecordError(f"{where}: question: expected a non-empty string, got {question!r}")
    objects, task = row.get("objects"), row.get("task") or "open"
    if objects is not None and not (isinstance(objects, list) and all(isinstance(o, str) for o in objects)):
        raise RecordError(f"{where}: objects: expected a list of object names, got {objects!r}")
    if task not in TASKS:
        raise RecordError(f"{where}: task: {task!r} is not one of {', '.join(TASKS)}")
    images = image_files(row.get("images") if row.get("images") is not None else row.get("image"), base, image_dir,
                         where, outside)  # fmt: skip
    if missing := next((p for p in images if not Path(p).is_file()), None):  # found now, not mid-run
        raise RecordError(f"{where}: image: {missing}: file not found")
    prompt = Prompt(rid, question.strip(), images, task, row.get("reference_answer"), objects)
    a, b = (Sample(f"{rid}#{s}", rid, full, "", answer, True, len(full.split()), "stop")
            for s, (answer, full) in zip("ab", answers))  # fmt: skip
    return Labelled(prompt, a, b, LABELS[label.strip().lower()])


def judge_eval(
    labels: str | Path, cfg: JudgeConfig, out_path: Path, cache_path: Path, *, template: str = "cot",
    allow_outside_paths: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Judge every labelled record and write the figures (and each record's outcome) to `out_path`
    (JSON, atomically); return the figures. Verdicts go through the cache at `cache_path`, so a
    re-run sends no request it already has an answer for."""
    from alignkit.judge import TRANSIENT, make_judge

    labels, out_path = Path(labels), Path(out_path)
    rub, vocab = load_rubric(cfg.rubric), load_vocabulary(cfg.vocabulary)
    records = read_labels(labels, out_path.parent / "images", template, allow_outside_paths)
    judge, tally = make_judge(rub, cfg), Tally()
    if judge is None:
        verdicts = {s.sample_id: to_dict(judge_reference(rub, r.prompt, s, vocab)) for r in records for s in (r.a, r.b)}
        outcomes = [_pointwise(r, verdicts[r.a.sample_id], verdicts[r.b.sample_id]) for r in records]
    else:
        cache = VerdictCache(cache_path)
        try:
            tally.open_bar(
                2 * (1 if rub.mode == "pairwise" else cfg.num_judgments) * len(records), f"judge-eval {rub.name}"
            )
            outcomes = asyncio.run(_ask(judge, rub, records, cfg.num_judgments, cache, tally))
        finally:
            tally.close_bar()
            cache.close()
        held = [o for o in outcomes if (o["error"] or "").split(":", 1)[0] in TRANSIENT]
        if held:
            raise StageIncomplete(
                f"judge-eval is incomplete: {len(held)} of {len(records)} records failed for a transient reason "
                f"(the first: {held[0]['error']}). The verdicts received are cached: run it again to ask for the rest"
            )
    result = {
        "labels": str(labels),
        "judge": f"{cfg.backend}/{rub.name}" + (f"/{cfg.model}" if judge else ""),
        "mode": rub.mode,
        **_figures(records, outcomes, rub, tally, judge is not None, cfg.num_judgments),
    }
    # the reference judge agrees with itself: compared only for an LLM judge
    agreement, compared = _agreement(records, outcomes, rub, vocab) if judge is not None else (None, 0)
    result.update(reference_agreement=agreement, reference_compared=compared)
    write_atomic(out_path, json.dumps({**result, "per_record": outcomes}, indent=2))
    return {**result, "output": str(out_path)}


async def _ask(judge, rub: Rubric, records: list[Labelled], num_judgments: int, cache: VerdictCache,
               tally: Tally) -> list[dict[str, Any]]:  # fmt: skip
    """Each record's outcome from the LLM judge: both answers scored, or both orders compared."""
    from alignkit.judge import pairwise
    from alignkit.judge.openai_judge import judge_samples

    by_id = {r.prompt.prompt_id: r for r in records}
    found: dict[str, dict[str, Any]] = {}
    async with judge.session(cache, tally):
        if rub.mode == "pairwise":

            def keep(comparisons: list[dict[str, Any]], _verdicts: list[dict[str, Any]]) -> None:
                found[comparisons[0]["prompt_id"]] = _compared(by_id[comparisons[0]["prompt_id"]], comparisons[0])

            await pairwise.judge_pairwise(judge, [(r.prompt, [r.a, r.b]) for r in records], keep)
        else:
            verdicts: dict[str, dict[str, Any]] = {}
            await judge_samples(judge, [(r.prompt, s) for r in records for s in (r.a, r.b)], num_judgments,
                                lambda v: verdicts.__setitem__(v["sample_id"], v))  # fmt: skip
            found = {rid: _pointwise(r, verdicts[r.a.sample_id], verdicts[r.b.sample_id]) for rid, r in by_id.items()}
    return [found[r.prompt.prompt_id] for r in records]


def _pointwise(record: Labelled, va: dict[str, Any], vb: dict[str, Any]) -> dict[str, Any]:
    """A pointwise judge's preference: the higher score, a tie when equal; none if either failed."""
    error = next((v["error"] or "unknown" for v in (va, vb) if v["status"] != "ok"), None)
    if error is not None:
        verdict = None
    elif math.isclose(va["score"], vb["score"], abs_tol=1e-9):
        verdict = "tie"
    else:
        verdict = "a" if va["score"] > vb["score"] else "b"
    return {"id": record.prompt.prompt_id, "label": record.label, "verdict": verdict, "consistent": None,
            "score_a": va["score"], "score_b": vb["score"], "error": error}  # fmt: skip


def _compared(record: Labelled, comparison: dict[str, Any]) -> dict[str, Any]:
    """A pairwise judge's preference from its comparison of both orders."""
    side = {record.a.sample_id: "a", record.b.sample_id: "b", "tie": "tie"}
    error = next((o["error"] for o in comparison["orders"] if o["error"]), None)
    return {"id": record.prompt.prompt_id, "label": record.label, "verdict": side.get(comparison["winner"]),
            "consistent": comparison["consistent"], "positions": [o["position"] for o in comparison["orders"]],
            "error": error}  # fmt: skip


def _figures(records: list[Labelled], outcomes: list[dict[str, Any]], rub: Rubric, tally: Tally, asked: bool,
             num_judgments: int) -> dict[str, Any]:  # fmt: skip
    """Accuracy with its interval, tie rate, position consistency, failures, requests and cost."""
    judged = [o for o in outcomes if o["verdict"] is not None]
    correct = sum(o["verdict"] == o["label"] for o in judged)
    both_orders = [o["consistent"] for o in judged if o["consistent"] is not None]
    cost = rub.price.cost(tally.prompt_tokens, tally.completion_tokens) if rub.price else None if asked else 0.0
    usage = {"requests": tally.requests, "cached": tally.cached, "prompt_tokens": tally.prompt_tokens,
             "completion_tokens": tally.completion_tokens, "cost": cost}  # fmt: skip
    per_verdict = 2 if rub.mode == "pairwise" else 2 * num_judgments  # judgments one verdict takes
    sent = (tally.ok + tally.failed - tally.cached) / per_verdict  # verdicts' worth of judgments sent now
    if not asked:  # the reference judge sends nothing
        per_1000 = {"requests": 0.0, "cost": 0.0}
    elif sent:
        per_1000 = {"requests": 1000 * tally.requests / sent, "cost": None if cost is None else 1000 * cost / sent}
    else:  # every judgment came from the cache: nothing was measured in this run
        per_1000 = {"requests": None, "cost": None}
    return {
        "records": len(records),
        "label_counts": dict(Counter(r.label for r in records)),
        "verdicts": len(judged),
        "failed": len(outcomes) - len(judged),
        "failed_reasons": dict(
            Counter((o["error"] or "unknown").split(":", 1)[0] for o in outcomes if o["verdict"] is None)
        ),
        "correct": correct,
        "accuracy": correct / len(judged) if judged else None,
        "accuracy_ci": wilson_interval(correct, len(judged)),
        "tie_rate": sum(o["verdict"] == "tie" for o in judged) / len(judged) if judged else None,
        "position_consistency": sum(both_orders) / len(both_orders) if both_orders else None,
        "usage": usage,
        "per_1000_verdicts": per_1000,
    }


def _agreement(records: list[Labelled], outcomes: list[dict[str, Any]], rub: Rubric, vocab) -> tuple[float | None, int]:
    """The share of records with gold annotations on which the judge prefers what the reference judge
    prefers (under the judge file's weights where the reference can compute them), and their number."""
    items = [(r.prompt, s) for r in records for s in (r.a, r.b)]
    ref = {v.sample_id: to_dict(v) for v in reference_verdicts(rub, items, vocab)}
    agree = []
    for r, o in zip(records, outcomes):
        if o["verdict"] is not None and r.a.sample_id in ref and r.b.sample_id in ref:
            agree.append(_pointwise(r, ref[r.a.sample_id], ref[r.b.sample_id])["verdict"] == o["verdict"])
    return (sum(agree) / len(agree) if agree else None), len(agree)


def figures_table(result: dict[str, Any]):
    """The headline figures as a two-column rich table that fits 80 columns."""
    from rich.table import Table

    def share(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    def number(x: float | None) -> str:
        return "-" if x is None else f"{x:,.4g}"

    lo, hi = result["accuracy_ci"]
    per_1000, usage = result["per_1000_verdicts"], result["usage"]
    table = Table(title=f"judge-eval: {result['judge']}", show_header=False, width=78)
    table.add_column("figure", no_wrap=True)
    table.add_column("value", overflow="fold")
    rows = [
        ("records (a / b / tie)", f"{result['records']} ({' / '.join(str(result['label_counts'].get(k, 0)) for k in ('a', 'b', 'tie'))})"),
        ("verdicts (failed)", f"{result['verdicts']} ({result['failed']})"),
        ("accuracy [95% CI]", f"{share(result['accuracy'])} [{lo:.3f}, {hi:.3f}]"),
        ("tie rate", share(result["tie_rate"])),
        ("position consistency", share(result["position_consistency"]) + ("" if result["mode"] == "pairwise" else " (pointwise)")),
        ("agreement with reference", share(result["reference_agreement"]) + f" (n={result['reference_compared']})"),
        ("requests (cached)", f"{usage['requests']} ({usage['cached']})"),
        ("cost", number(usage["cost"])),
        ("requests / 1,000 verdicts", number(per_1000["requests"])),
        ("cost / 1,000 verdicts", number(per_1000["cost"])),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    return table
