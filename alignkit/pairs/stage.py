"""The `pairs` stage: chosen/rejected preference pairs (TRL format) from the judged samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit.records import Prompt, Sample, Verdict, read_records, write_jsonl
from alignkit.stage import Context, template_files


class PairsStage:
    """Build chosen/rejected preference pairs (TRL format) from the judged samples."""

    name = command = "pairs"
    per_round = True
    exclude: frozenset[str] = frozenset()

    def config(self, recipe) -> tuple[str, ...]:
        return ("pairs", "sample.template")

    def reads(self, ctx: Context) -> list[Path]:
        paths = ctx.paths
        return [paths.prompts, paths.samples, paths.verdicts, *template_files(ctx.config.sample.template)]

    def upstream(self, ctx: Context) -> dict[str, Any]:
        return {}

    def output(self, ctx: Context) -> Path:
        return ctx.paths.pairs

    def run(self, ctx: Context, fingerprint: str) -> dict[str, Any]:
        from alignkit.pairs import build_pairs
        from alignkit.sample.templates import load_template

        prompts = read_records(ctx.paths.prompts, Prompt)
        template = load_template(ctx.config.sample.template)
        pairs, summary = build_pairs(
            prompts, read_records(ctx.paths.samples, Sample), read_records(ctx.paths.verdicts, Verdict),
            {p.prompt_id: template.render(p.question) for p in prompts}, ctx.config.pairs,
        )  # fmt: skip
        write_jsonl(ctx.paths.pairs, pairs)
        return summary
