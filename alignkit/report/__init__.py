"""The run report: one self-contained HTML file (`RUN_DIR/report.html`) with plots and a pair viewer.

`report_data(root)` reads a run directory (stages.json, each round's samples, verdicts,
judge_report.json, pairs and train/metrics.jsonl, eval/*/results.json) and computes every figure
the page shows, so the numbers are testable in Python; the page's own small script only draws
them (SVG) and pages through the pairs. Nothing is fetched when the page is viewed: the script,
the styles and the image thumbnails (JPEG data URIs, each image once) are inside the file.
A section whose files do not exist yet (a run stopped early, a recipe without `eval`) is None,
and the page says so.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import statistics
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

from alignkit.errors import RecordError
from alignkit.records import iter_jsonl, load_image, write_atomic
from alignkit.stage import RunPaths, stage_key

THUMBNAIL_SIDE = 256
"""Longest side of an embedded image thumbnail, in pixels (a few thousand pairs stay a few MB)."""
SCORE_BINS = 10
TRAIN_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
              "reward/raw", "kl", "kl_coef", "policy_loss", "value_loss", "entropy", "learning_rate", "lr")  # fmt: skip
"""Training metrics drawn first, in this order; every other numeric key follows."""


def histogram(values: list[float], bins: int = SCORE_BINS, lo: float = 0.0, hi: float = 1.0) -> dict[str, Any]:
    """Counts in `bins` equal bins over [lo, hi], widened to the values' range; the last bin is closed."""
    if values:
        lo, hi = min(lo, min(values)), max(hi, max(values))
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    return {"edges": [lo + i * width for i in range(bins + 1)], "counts": counts}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [obj for _, obj in iter_jsonl(path)] if path.is_file() else []


def _json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(f"{path}: not valid JSON ({e})") from None


def _rounds(root: Path) -> list[int]:
    """Round 1, plus every round-<r>/ directory."""
    found = {int(m.group(1)) for p in root.glob("round-*") if (m := re.fullmatch(r"round-(\d+)", p.name))}
    return sorted({1} | found)


def _samples(samples: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any] | None:
    """Answer counts: truncated, without a final answer, and (from the stage summary) repeats and failed prompts."""
    if not samples:
        return None
    return {
        "failed_prompts": len(summary.get("failed") or []),
        "duplicates": summary.get("duplicates"),
        "total": len(samples),
        "prompts": len({s["prompt_id"] for s in samples}),
        "truncated": sum(s.get("finish_reason") == "length" for s in samples),
        "unparsed": sum(not s.get("answer_parsed", True) for s in samples),
        "mean_tokens": statistics.fmean(s.get("num_tokens", 0) for s in samples),
    }


def _judge(verdicts: list[dict[str, Any]], report: dict[str, Any] | None, summary: dict[str, Any]) -> dict[str, Any] | None:
    """Score histograms per criterion, failure reasons, consistency figures and the judge's spending."""
    if not verdicts:
        return None
    ok = [v for v in verdicts if v["status"] == "ok" and v.get("score") is not None]
    criteria: dict[str, list[float]] = {"score": [v["score"] for v in ok]}
    for v in ok:
        for name, value in (v.get("scores") or {}).items():
            criteria.setdefault(name, []).append(value)
    report = report or {}
    return {
        "total": len(verdicts),
        "ok": len(ok),
        "scores": {name: {"n": len(vals), "mean": statistics.fmean(vals) if vals else None, **histogram(vals)}
                   for name, vals in criteria.items()},  # fmt: skip
        "failures": dict(Counter((v.get("error") or "unknown").split(":", 1)[0] for v in verdicts if v["status"] != "ok")),
        "self_consistency": report.get("self_consistency"),
        "position": report.get("position"),
        "reference_agreement": report.get("reference_agreement"),
        "usage": {key: summary.get(key) for key in ("judge", "requests", "cached", "request_rate", "cost")}
        | (summary.get("usage") or {}),
    }


def _length(pair: dict[str, Any], side: str, tokens: dict[str, int]) -> tuple[int, str]:
    """An answer's length: its token count from samples.jsonl, else its characters."""
    sid = pair.get(f"{side}_id", "")
    if sid in tokens:
        return tokens[sid], "tokens"
    return len(_text(pair[side])), "characters"


def _text(conversation: list[dict[str, Any]] | str) -> str:
    """The text of a conversation's turns (TRL's format), or the string itself."""
    if isinstance(conversation, str):
        return conversation
    parts = []
    for turn in conversation:
        content = turn.get("content", "")
        parts.extend([content] if isinstance(content, str) else [c.get("text", "") for c in content if c.get("type") == "text"])
    return "\n".join(parts)


def _pairs(pairs: list[dict[str, Any]], samples: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any] | None:
    """Pair counts, what the pairs stage skipped, the margin histogram and chosen vs rejected length."""
    if not pairs and not summary:
        return None
    tokens = {s["sample_id"]: s["num_tokens"] for s in samples if "num_tokens" in s}
    lengths = [(_length(p, "chosen", tokens), _length(p, "rejected", tokens)) for p in pairs]
    units = {unit for (_, a), (_, b) in lengths for unit in (a, b)}
    margins = [p["margin"] for p in pairs]
    return {
        "count": len(pairs),
        "prompts_with_pairs": len({p["prompt_id"] for p in pairs}),
        "skipped": summary.get("skipped", {}),
        "margin": {"mean": statistics.fmean(margins) if margins else None, **histogram(margins)},
        "length": {
            "unit": units.pop() if len(units) == 1 else "tokens or characters",
            "points": [[r, c] for (c, _), (r, _) in lengths],  # x: rejected, y: chosen
            "chosen_mean": statistics.fmean(c for (c, _), _ in lengths) if lengths else None,
            "rejected_mean": statistics.fmean(r for _, (r, _) in lengths) if lengths else None,
            "chosen_longer": sum(c > r for (c, _), (r, _) in lengths),
            "chosen_shorter": sum(c < r for (c, _), (r, _) in lengths),
        },
    }


def curves(path: Path) -> dict[str, list[list[float]]] | None:
    """Every numeric metric in a metrics.jsonl as [step, value] points, the known ones first."""
    rows = _jsonl(path)
    if not rows:
        return None
    series: dict[str, list[list[float]]] = {}
    for i, row in enumerate(rows):
        step = row.get("step", i + 1)
        for key, value in row.items():
            if key not in ("step", "epoch") and _finite(value):
                series.setdefault(key, []).append([step, value])
    order = [k for k in TRAIN_KEYS if k in series] + sorted(k for k in series if k not in TRAIN_KEYS)
    return {k: series[k] for k in order}


def _finite(value: Any) -> bool:
    """A number JSON can carry (not a bool, NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _eval(root: Path) -> dict[str, Any] | None:
    """Every evaluation (base first, then by round) side by side, with intervals where present."""
    from alignkit.evaluate import _flatten, _intervals

    found = {p.parent.name: p for p in (root / "eval").glob("*/results.json")}
    labels = sorted(found, key=lambda n: (n != "base", int(n.split("-")[1]) if n.startswith("round-") else 0, n))
    if not labels:
        return None
    values, cis = {}, {}
    for label in labels:
        results = _json(found[label])
        values[label] = {k: v for k, v in _flatten(results).items() if _finite(v)}
        cis[label] = {k: ci for k, ci in _intervals(results).items() if all(map(_finite, ci))}
    names = dict.fromkeys(k for label in labels for k in values[label])
    metrics = [{"name": n, "values": {lab: values[lab].get(n) for lab in labels},
                "ci": {lab: cis[lab][n] for lab in labels if n in cis[lab]},
                "count": all(isinstance(values[lab].get(n, 0), int) for lab in labels)} for n in names]  # fmt: skip
    return {"labels": labels, "metrics": metrics}


class _Thumbnails:
    """Each image file once, as a small JPEG data URI keyed by a short id."""

    def __init__(self, root: Path, side: int):
        self.root, self.side = root, side
        self.uris: dict[str, str] = {}
        self.ids: dict[str, str | None] = {}

    def key(self, image: str) -> str | None:
        if image not in self.ids:
            path = Path(image) if Path(image).is_absolute() else self.root / image
            try:
                img = load_image(str(path))
            except (RecordError, OSError):
                self.ids[image] = None  # moved or deleted since the run: the viewer says so
                return None
            img.thumbnail((self.side, self.side))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
            self.ids[image] = key = f"i{len(self.uris)}"
            self.uris[key] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        return self.ids[image]


def report_data(root: str | Path, thumbnail_side: int = THUMBNAIL_SIDE) -> dict[str, Any]:
    """Everything the report shows, computed from a run directory (see the module docstring)."""
    root = Path(root)
    state_file = RunPaths(root).state
    if not state_file.is_file():
        raise RecordError(f"{root}: not a run directory (no stages.json); run `alignkit run RECIPE` first")
    state = _json(state_file)
    if not isinstance(state, dict):
        raise RecordError(f"{state_file}: expected a JSON object of stage states")
    questions = {p["prompt_id"]: p.get("question", "") for p in _jsonl(RunPaths(root).prompts)}
    thumbs = _Thumbnails(root, thumbnail_side)
    rounds, viewer, cost = [], [], []
    for r in _rounds(root):
        paths = RunPaths(root, r)
        samples, pairs = _jsonl(paths.samples), _jsonl(paths.pairs)
        judge_summary = state.get(stage_key("judge", r), {}).get("summary") or {}
        pairs_summary = state.get(stage_key("pairs", r), {}).get("summary") or {}
        judge = _judge(_jsonl(paths.verdicts), _json(paths.work / "judge_report.json"), judge_summary)
        if judge is not None:
            cost.append({"round": r, **judge["usage"]})
        rounds.append({
            "round": r,
            "samples": _samples(samples, state.get(stage_key("sample", r), {}).get("summary") or {}),
            "judge": judge,
            "pairs": _pairs(pairs, samples, pairs_summary),
            "train": curves(paths.train / "metrics.jsonl"),
            "reward_model": curves(paths.reward_model / "metrics.jsonl"),
        })  # fmt: skip
        tokens = {s["sample_id"]: s.get("num_tokens") for s in samples}
        for p in pairs:
            viewer.append({
                "round": r, "prompt_id": p["prompt_id"], "question": questions.get(p["prompt_id"], _text(p["prompt"])),
                "images": [thumbs.key(i) for i in p.get("images", [])],
                "margin": p["margin"], "chosen_score": p["chosen_score"], "rejected_score": p["rejected_score"],
                "chosen": _text(p["chosen"]), "rejected": _text(p["rejected"]),
                "chosen_rationale": p.get("chosen_rationale", ""), "rejected_rationale": p.get("rejected_rationale", ""),
                "chosen_tokens": tokens.get(p.get("chosen_id")), "rejected_tokens": tokens.get(p.get("rejected_id")),
            })  # fmt: skip
    recipe = RunPaths(root).recipe
    return {
        "title": root.resolve().name,
        "root": str(root.resolve()),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "recipe": recipe.read_text(encoding="utf-8") if recipe.is_file() else None,
        "stages": [{"key": k, "status": v.get("status"), "seconds": (v.get("summary") or {}).get("seconds")}
                   for k, v in state.items()],  # fmt: skip
        "rounds": rounds,
        "sft": curves(RunPaths(root).sft / "metrics.jsonl"),
        "eval": _eval(root),
        "cost": cost,
        "pairs": viewer,
        "images": thumbs.uris,
    }


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def render(data: dict[str, Any]) -> str:
    """The HTML page: the template with the styles, the script and the data inlined."""
    # A "</script" or "<!--" from a model's answer must not end or change the <script> block: every "<"
    # becomes the JSON escape \u003c, the same string to the parser.
    payload = json.dumps(data, ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")
    parts = {"CSS": _asset("report.css"), "JS": _asset("report.js"), "DATA": payload}
    # one pass, so nothing inlined is searched for markers again
    return re.sub(r"/\*REPORT_(CSS|JS|DATA)\*/", lambda m: parts[m.group(1)], _asset("page.html"))


def write_report(root: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of the run in `root` to `out` (default `root/report.html`), atomically."""
    root = Path(root)
    html = render(report_data(root))
    return write_atomic(Path(out) if out is not None else root / "report.html", html)


__all__ = ["curves", "histogram", "render", "report_data", "write_report"]
