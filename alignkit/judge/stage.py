"""The `judge` stage: one verdict per sample, from the reference judge or an OpenAI-compatible LLM judge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit.records import Prompt, Sample, read_records
from alignkit.stage import Context

# Keys of the judge section that cannot change a verdict (how it is reached, not what it says; the
# calibration gate's keys are the runner's, checked before any stage).
UNCHANGING = frozenset({"judge.concurrency", "judge.api_key_env", "judge.rpm", "judge.tpm", "judge.max_requests",
                        "judge.max_cost", "judge.calibration", "judge.min_accuracy"})  # fmt: skip


def rubric_file(rubric: str) -> Path:
    """The judge file a `judge.rubric` names (built-in or path), checked: its bytes are part of fingerprints."""
    from alignkit.judge.rubric import load_rubric

    return Path(load_rubric(rubric).path)


def vocabulary_files(spec: str) -> list[Path]:
    """The YAML file a vocabulary setting names (none for the built-in `shapes` and `coco`)."""
    from alignkit.objects import BUILTIN_VOCABULARIES

    return [Path(spec)] if spec not in BUILTIN_VOCABULARIES and Path(spec).is_file() else []


def judge_files(cfg) -> list[Path]:
    """The files a judge section reads: its judge file and its vocabulary file, if any."""
    return [rubric_file(cfg.rubric), *vocabulary_files(cfg.vocabulary)]


class JudgeStage:
    """Score every sample with the reference judge or an OpenAI-compatible LLM judge (images attached).

    Writes verdicts.jsonl, judge_report.json (score distributions, self-consistency, position
    consistency, agreement with the reference judge) and, for a pairwise judge, comparisons.jsonl.
    Verdicts are cached in judge_cache.sqlite: a re-run never pays twice.

    A judge is one YAML file: a built-in name (`alignkit judges`) or a path, set as
    judge.rubric=NAME_OR_PATH. Its keys:

    name, description: what it is called and what it grades.

    mode: single (default; one answer per request) or pairwise (two answers, A and B).

    system, user: Jinja2 templates (sandboxed). Single: question, answer (the final answer),
    response (the full text), reference_answer, objects. Pairwise: question, answer_a, response_a,
    answer_b, response_b, reference_answer, objects. Answers are untrusted: put them between tags
    and tell the judge they are data.

    schema: the verdict's JSON schema, sent as response_format json_schema (strict): an object,
    every property required, additionalProperties false, `rationale` (string) first. Pairwise
    verdicts also have `winner`, a string with enum A, B, tie.

    scores (single): how the verdict becomes one score in 0..1. A numeric field: `NAME: {range: [0, 10],
    weight: 1.0, higher_is_better: true}`. Or the share of an array's items whose boolean field is
    true: `NAME: {share_of: claims, field: supported}`. Pairwise judges have no scores: a sample's
    score is its win rate over the prompt's other samples, each pair judged in both orders (a
    winner only when both orders agree).

    sampling: temperature, top_p, max_tokens, seed, and retry_max_tokens (a reply cut at max_tokens is
    recorded as `truncated`, not re-asked as it was; with retry_max_tokens it is asked once more with
    that budget). price (optional): prompt_per_million, completion_per_million, to report the run's cost.

    See judges/*.yaml and examples/custom_judge.yaml.
    """

    name = command = "judge"
    per_round = True
    exclude = UNCHANGING

    def config(self, recipe) -> tuple[str, ...]:
        return ("judge",)

    def reads(self, ctx: Context) -> list[Path]:
        return [ctx.paths.prompts, ctx.paths.samples, *judge_files(ctx.config.judge)]

    def upstream(self, ctx: Context) -> dict[str, Any]:
        return {}

    def output(self, ctx: Context) -> Path:
        return ctx.paths.verdicts

    def dry_run(self, ctx: Context) -> dict[str, Any]:
        """What `run` would send and spend, sending nothing (`alignkit judge RECIPE --dry-run`)."""
        from alignkit.judge import plan_judge

        return plan_judge(read_records(ctx.paths.prompts, Prompt), read_records(ctx.paths.samples, Sample),
                          ctx.config.judge, ctx.paths.judge_cache)  # fmt: skip

    def run(self, ctx: Context, fingerprint: str) -> dict[str, Any]:
        from alignkit.judge import run_judge

        return run_judge(
            read_records(ctx.paths.prompts, Prompt), read_records(ctx.paths.samples, Sample), ctx.paths.verdicts,
            ctx.config.judge, fingerprint=fingerprint, cache_path=ctx.paths.judge_cache,
        )  # fmt: skip
