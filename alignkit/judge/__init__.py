"""The judge stage: samples in, one Verdict per sample out.

Backends: `reference` (offline, against the prompt's gold annotations) and `openai` (an LLM
judge over any OpenAI-compatible API, images included). The judge file (judges/*.yaml, or a
path) holds the prompts, the verdict schema and the score weights.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from alignkit.judge.cache import VerdictCache
from alignkit.judge.openai_judge import OpenAIJudge
from alignkit.judge.progress import Tally
from alignkit.judge.reference import check_rubric, judge_reference
from alignkit.judge.rubric import JudgeError, Rubric, RubricError, load_rubric
from alignkit.records import Prompt, ResumableJsonl, Sample

__all__ = ["JudgeError", "Rubric", "RubricError", "load_rubric", "run_judge"]

BACKENDS = ("reference", "openai")


def run_judge(
    prompts: list[Prompt],
    samples: list[Sample],
    out_path: Path,
    *,
    fingerprint: str,
    backend: str = "reference",
    rubric: str = "overall",
    model: str | None = None,
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    concurrency: int = 8,
    timeout: float = 60.0,
    max_retries: int = 3,
    image_max_side: int = 512,
    cache_path: Path | None = None,
) -> dict[str, Any]:
    """Judge every sample and write its Verdict to `out_path` (jsonl); return a summary.

    The output is resumable: a killed run restarted with the same `fingerprint` keeps the
    verdicts already written (the judge file, backend, model and image size are folded into the
    fingerprint here, so changing them starts over). For `openai`, `cache_path` (default:
    `judge_cache.sqlite` beside the output) holds every valid verdict, so a re-run sends no
    request it already has an answer for; failed verdicts are not cached, so deleting the output
    and running again re-asks only those. `max_retries` bounds both the client's transport
    retries and the re-asks of a verdict that does not parse or validate. `model` names the
    judge model (required for `openai`); `api_key_env` names the variable holding the key.

    Summary keys: judge, backend, total, ok, failed, failed_reasons (kind -> count), resumed,
    cached, requests, usage (prompt_tokens, completion_tokens), mean_score, output.
    """
    rub = load_rubric(rubric)
    items = _join(prompts, samples)
    if backend == "reference":
        check_rubric(rub)
        judge = None
    elif backend == "openai":
        if not model:
            raise JudgeError("judge.model is required for judge.backend=openai")
        judge = OpenAIJudge(
            rub,
            model=model,
            base_url=base_url,
            api_key_env=api_key_env,
            concurrency=concurrency,
            timeout=timeout,
            max_retries=max_retries,
            image_max_side=image_max_side,
        )
    else:
        raise JudgeError(f"unknown judge backend {backend!r}: expected one of {list(BACKENDS)}")

    out_path = Path(out_path)
    key = json.dumps([fingerprint, backend, rub.content_hash, model, image_max_side])
    out = ResumableJsonl(out_path, hashlib.sha256(key.encode()).hexdigest(), id_key="sample_id")
    todo = [(p, s) for p, s in items if s.sample_id not in out.done]
    tally = Tally()
    tally.open_bar(len(todo), f"judge {rub.name}")
    cache = None
    try:
        if judge is None:
            for p, s in todo:
                verdict = judge_reference(rub, p, s)
                out.append([verdict])
                tally.add(verdict)
        else:
            cache = VerdictCache(cache_path or out_path.parent / "judge_cache.sqlite")
            asyncio.run(judge.run(todo, lambda v: out.append([v]), tally, cache))
    except BaseException:
        out.close()
        raise
    finally:
        tally.close_bar()
        if cache is not None:
            cache.close()
    out.finish()

    ids = {s.sample_id for _, s in items}
    written = [v for sid, v in out.done.items() if sid in ids]
    scores = [v["score"] for v in written if v["status"] == "ok"]
    return {
        "judge": f"{backend}/{rub.name}" + (f"/{model}" if judge else ""),
        "backend": backend,
        "total": len(items),
        "ok": len(scores),
        "failed": len(written) - len(scores),
        "failed_reasons": dict(
            Counter((v["error"] or "unknown").split(":", 1)[0] for v in written if v["status"] != "ok")
        ),
        "resumed": len(items) - len(todo),
        "cached": tally.cached,
        "requests": tally.requests,
        "usage": {"prompt_tokens": tally.prompt_tokens, "completion_tokens": tally.completion_tokens},
        "mean_score": sum(scores) / len(scores) if scores else None,
        "output": str(out_path),
    }


def _join(prompts: list[Prompt], samples: list[Sample]) -> list[tuple[Prompt, Sample]]:
    """Each sample with its prompt; unknown prompt ids and duplicate sample ids are errors."""
    by_id = {p.prompt_id: p for p in prompts}
    seen: set[str] = set()
    items = []
    for s in samples:
        if s.prompt_id not in by_id:
            raise JudgeError(f"sample {s.sample_id}: unknown prompt_id {s.prompt_id!r} (not in the prompts)")
        if s.sample_id in seen:
            raise JudgeError(f"sample {s.sample_id}: duplicate sample_id")
        seen.add(s.sample_id)
        items.append((by_id[s.prompt_id], s))
    return items
