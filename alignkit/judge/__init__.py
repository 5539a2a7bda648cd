"""The judge stage: samples in, one Verdict per sample out.

Backends: `reference` (offline, against the prompt's gold annotations) and `openai` (an LLM
judge over any OpenAI-compatible API, images included). The judge file (judges/*.yaml, or a
path) holds the prompts, the verdict schema and the score weights; a `pairwise` judge file
compares samples two by two instead (see `pairwise`). Every run writes a quality report.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignkit.errors import SpendCapReached, StageIncomplete
from alignkit.judge.cache import VerdictCache, cache_key
from alignkit.judge.config import JudgeConfig
from alignkit.judge.progress import Tally
from alignkit.judge.reference import check_rubric, judge_reference, reference_verdicts
from alignkit.judge.report import format_report, quality_report, write_report
from alignkit.judge.rubric import JudgeError, Rubric, RubricError, load_rubric
from alignkit.objects import load_vocabulary
from alignkit.records import Prompt, ResumableJsonl, Sample

if TYPE_CHECKING:  # the OpenAI client is imported when a judge is made: `alignkit --help` stays quick
    from alignkit.judge.openai_judge import OpenAIJudge

__all__ = ["JudgeConfig", "JudgeError", "Rubric", "RubricError", "load_rubric", "make_judge", "plan_judge", "run_judge"]

BACKENDS = ("reference", "openai")
FLUSH_SECONDS = 0.2  # how often finished verdicts are appended (and fsynced) to the output


def run_judge(
    prompts: list[Prompt],
    samples: list[Sample],
    out_path: Path,
    cfg: JudgeConfig = JudgeConfig(),
    *,
    fingerprint: str,
    cache_path: Path | None = None,
) -> dict[str, Any]:
    """Judge every sample and write its Verdict to `out_path` (jsonl); return a summary.

    The output is resumable: a killed run restarted with the same `fingerprint` keeps the
    verdicts already written (the judge file, backend, model, image size, `num_judgments` and the
    reference judge's `vocabulary` are folded into the fingerprint here, so changing them starts
    over). For `openai`, `cache_path` (default: `judge_cache.sqlite` beside the output) holds every valid verdict, so a re-run
    sends no request it already has an answer for; failed verdicts are not cached, so deleting
    the output and running again re-asks only those. `max_retries` bounds both the client's
    transport retries and the re-asks of a verdict that does not parse or validate. `model`
    names the judge model (required for `openai`); `api_key_env` names the variable holding the
    key. `rpm` / `tpm` cap requests and tokens per minute. `num_judgments` > 1 asks each sample
    that many times (each its own cache entry) and scores it with the mean (self-consistency).

    A pairwise judge file compares each prompt's samples two by two, both orders each (see
    `judge.pairwise`): a sample's score is its win rate, and the comparisons go to
    `comparisons.jsonl` beside the output. Every run writes `judge_report.json` beside the
    output (see `judge.report`) and prints its headline figures.

    Summary keys: judge, backend, total, ok, failed, failed_reasons (kind -> count), resumed,
    judgments, cached, requests, request_rate (per second), usage (prompt_tokens,
    completion_tokens), cost (None without a `price` in the judge file), mean_score,
    position_consistency (pairwise only), output, report.
    """
    backend, model, num_judgments = cfg.backend, cfg.model, cfg.num_judgments
    rub = load_rubric(cfg.rubric)
    vocab = load_vocabulary(cfg.vocabulary)  # a bad vocabulary file fails before any judging
    items = _join(prompts, samples)
    judge = make_judge(rub, cfg)

    out_path = Path(out_path)
    key = json.dumps([fingerprint, backend, rub.content_hash, model, cfg.image_max_side, num_judgments, cfg.vocabulary])
    key = hashlib.sha256(key.encode()).hexdigest()
    out = ResumableJsonl(out_path, key, id_key="sample_id")
    comps = ResumableJsonl(out_path.with_name("comparisons.jsonl"), key, "comparison_id") if rub.mode == "pairwise" else None
    todo = [(p, s) for p, s in items if s.sample_id not in out.done]
    tally, held = Tally(), []
    cache = None
    try:
        if judge is None:
            tally.open_bar(len(todo), f"judge {rub.name}")
            for p, s in todo:
                verdict = judge_reference(rub, p, s, vocab)
                out.append([verdict])
                tally.add(verdict.status == "ok")
        else:
            cache = VerdictCache(cache_path or out_path.parent / "judge_cache.sqlite")
            asyncio.run(_judge_openai(judge, items, todo, num_judgments, out, comps, cache, tally, held))
        if held:  # transient failures: not final; keep what was received and say how to ask again
            kinds = Counter(v["error"].split(":", 1)[0] for v in held)
            raise StageIncomplete(
                f"the judge is incomplete: {len(held)} of {len(items)} verdicts failed for a transient reason "
                f"({', '.join(f'{k}: {n}' for k, n in kinds.items())}; the first: {held[0]['error']}). The "
                f"{len(out.done)} received are kept: run the judge stage again to ask for exactly those"
            )
    except BaseException as e:
        out.close()
        if comps is not None:
            comps.close()
        if isinstance(e, SpendCapReached):
            raise SpendCapReached(
                f"the judge stopped: {e}, with {len(out.done)} of {len(items)} verdicts; the rest were not asked. "
                "Raise the cap and run again: nothing already received is asked (or paid for) again"
            ) from None
        raise
    finally:
        tally.close_bar()
        if cache is not None:
            cache.close()
    out.finish()

    ids = {s.sample_id for _, s in items}
    written = [v for sid, v in out.done.items() if sid in ids]
    comparisons = list(comps.done.values()) if comps is not None else None
    if comps is not None:
        comps.finish()
    reference = reference_verdicts(rub, items, vocab) if judge is not None else None
    report = quality_report(written, comparisons=comparisons, reference=reference)
    usage = {"prompt_tokens": tally.prompt_tokens, "completion_tokens": tally.completion_tokens}
    cost = rub.price.cost(**usage) if rub.price else None
    report["usage"] = {"requests": tally.requests, "cached": tally.cached, **usage, "cost": cost}
    report_path = write_report(out_path.with_name("judge_report.json"), report)
    print(format_report(report), file=sys.stderr)

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
        "judgments": tally.ok + tally.failed,
        "cached": tally.cached,
        "requests": tally.requests,
        "request_rate": round(tally.request_rate(), 2),
        "usage": usage,
        "cost": cost,
        "mean_score": sum(scores) / len(scores) if scores else None,
        **({"position_consistency": report["position"]["consistency"]} if comparisons is not None else {}),
        "output": str(out_path),
        "report": str(report_path),
    }


def plan_judge(prompts: list[Prompt], samples: list[Sample], cfg: JudgeConfig, cache_path: Path) -> dict[str, Any]:
    """What judging `samples` would send, sending nothing: the requests (verdicts already in the
    cache are free), their prompt tokens (estimated as the rate caps do: text / 4, 765 per image),
    at most `max_tokens` completion tokens each, and the most that costs at the judge file's price."""
    import itertools

    from alignkit.judge.openai_judge import build_messages
    from alignkit.throttle import estimate_tokens

    rub, items = load_rubric(cfg.rubric), _join(prompts, samples)
    sampling = {k: v for k, v in rub.sampling.items() if k != "retry_max_tokens"}
    max_tokens = int(sampling.get("max_tokens", 512))
    if cfg.backend == "reference":
        asks = []
    elif rub.mode == "pairwise":
        groups: dict[str, tuple[Prompt, list[Sample]]] = {}
        for p, smp in items:
            groups.setdefault(p.prompt_id, (p, []))[1].append(smp)
        asks = [(p, 0, {"answer_a": x.answer, "response_a": x.text, "answer_b": y.answer, "response_b": y.text})
                for p, ss in groups.values() for a, b in itertools.combinations(ss, 2) for x, y in ((a, b), (b, a))]
    else:
        asks = [(p, r, {"answer": smp.answer, "response": smp.text}) for p, smp in items for r in range(cfg.num_judgments)]
    cache = VerdictCache(cache_path) if cache_path.exists() else None
    requests = cached = prompt_tokens = 0
    try:
        for prompt, repetition, untrusted in asks:
            messages = build_messages(rub, prompt, cfg.image_max_side, **untrusted)
            if cache is not None and cache.get(cache_key(rub.request_hash, cfg.model, sampling, messages, repetition)):
                cached += 1
                continue
            requests += 1
            prompt_tokens += estimate_tokens(messages, 0)
    finally:
        if cache is not None:
            cache.close()
    completion = requests * max_tokens
    return {"judge": f"{cfg.backend}/{rub.name}", "samples": len(items), "requests": requests, "cached": cached,
            "prompt_tokens": prompt_tokens, "completion_tokens_at_most": completion,
            "cost_at_most": rub.price.cost(prompt_tokens, completion) if rub.price else None}  # fmt: skip


def make_judge(rub: Rubric, cfg: JudgeConfig) -> OpenAIJudge | None:
    """The OpenAI judge, or None for the reference backend; refuses settings that do not combine."""
    backend, num_judgments = cfg.backend, cfg.num_judgments
    if num_judgments < 1:
        raise JudgeError(f"judge.num_judgments must be at least 1, got {num_judgments}")
    if backend == "reference":
        check_rubric(rub)
        if num_judgments > 1:
            raise JudgeError("judge.num_judgments > 1 needs judge.backend=openai (the reference judge is deterministic)")
        return None
    if backend != "openai":
        raise JudgeError(f"unknown judge backend {backend!r}: expected one of {list(BACKENDS)}")
    if not cfg.model:
        raise JudgeError("judge.model is required for judge.backend=openai")
    if rub.mode == "pairwise" and num_judgments > 1:
        raise JudgeError(
            f"{rub.path}: judge.num_judgments > 1 is not supported by a pairwise judge "
            "(each pair is already judged twice, once per order)"
        )
    options = cfg.model_dump(include={"model", "base_url", "api_key_env", "concurrency", "timeout", "max_retries",
                                      "image_max_side", "rpm", "tpm", "max_requests", "max_cost"})  # fmt: skip
    from alignkit.judge.openai_judge import OpenAIJudge

    return OpenAIJudge(rub, **options)


class _Batched:
    """Appends records to a ResumableJsonl in batches, a few times a second, not one fsync per verdict.

    Safe against a kill: every verdict is in the cache before it gets here, so lines lost with
    the last batch are rebuilt from the cache by the next run without a request.
    """

    def __init__(self, out: ResumableJsonl, id_key: str):
        self.out, self.id_key, self.pending = out, id_key, {}

    def add(self, records: list[dict[str, Any]]) -> None:
        self.pending.update((r[self.id_key], r) for r in records if r[self.id_key] not in self.out.done)

    def flush(self) -> None:
        if self.pending:
            self.out.append(list(self.pending.values()))
            self.pending = {}


# Failure kinds that say nothing about the sample (the server or the network failed): not final.
TRANSIENT = ("timeout", "connection_error", "server_error", "rate_limited")


def transient(verdict: dict[str, Any]) -> bool:
    """A failed verdict whose cause was transient: the stage is incomplete, and a re-run asks again."""
    return verdict["status"] != "ok" and (verdict.get("error") or "").split(":", 1)[0] in TRANSIENT


async def _judge_openai(
    judge: OpenAIJudge,
    items: list[tuple[Prompt, Sample]],
    todo: list[tuple[Prompt, Sample]],
    num_judgments: int,
    out: ResumableJsonl,
    comps: ResumableJsonl | None,
    cache: VerdictCache,
    tally: Tally,
    held: list[dict[str, Any]],
) -> None:
    """Judge the samples still to do, writing verdicts (and comparisons) in batches as they come;
    transient failures go to `held` instead (pairwise: every verdict of a prompt with such an order)."""
    from alignkit.judge import pairwise
    from alignkit.judge.openai_judge import judge_samples

    writers = [_Batched(out, "sample_id")] + ([_Batched(comps, "comparison_id")] if comps is not None else [])

    async def flush_every(seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            for w in writers:
                w.flush()

    flusher = asyncio.create_task(flush_every(FLUSH_SECONDS))
    try:
        async with judge.session(cache, tally):
            if comps is None:
                tally.open_bar(len(todo) * num_judgments, f"judge {judge.rubric.name}")
                def keep(v: dict[str, Any]) -> None:  # a transient failure is not final: not written, asked again
                    if transient(v):
                        held.append(v)
                    else:
                        writers[0].add([v])

                await judge_samples(judge, todo, num_judgments, keep)
            else:
                groups = _pairwise_groups(items, todo)
                tally.open_bar(pairwise.num_judgments(groups), f"judge {judge.rubric.name} (pairwise)")
                def keep_prompt(comparisons: list[dict[str, Any]], verdicts: list[dict[str, Any]]) -> None:
                    # an order that failed for a transient reason: the prompt is not final, asked again
                    errors = [o.get("error") or "" for c in comparisons for o in c["orders"]]
                    if failed := [e for e in errors if e.split(":", 1)[0] in TRANSIENT]:
                        held.extend({**v, "status": "failed", "error": failed[0]} for v in verdicts)
                    else:
                        writers[1].add(comparisons)
                        writers[0].add(verdicts)

                await pairwise.judge_pairwise(judge, groups, keep_prompt)
    finally:
        flusher.cancel()
        for w in writers:
            w.flush()


def _pairwise_groups(
    items: list[tuple[Prompt, Sample]], todo: list[tuple[Prompt, Sample]]
) -> list[tuple[Prompt, list[Sample]]]:
    """Prompts with any sample left, each with ALL its samples: finished comparisons come from the cache."""
    left = {p.prompt_id for p, _ in todo}
    groups: dict[str, tuple[Prompt, list[Sample]]] = {}
    for p, s in items:
        if p.prompt_id in left:
            groups.setdefault(p.prompt_id, (p, []))[1].append(s)
    return list(groups.values())


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
