"""The `pairs` stage: chosen/rejected preference pairs (TRL format) from the judged samples, or
converted from a file of ready pairs (`data.pairs`: RLAIF-V, VLFeedback, TRL preference)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit.records import Prompt, Sample, Verdict, read_records, write_jsonl
from alignkit.stage import Context, template_files


def _ready_pairs(recipe) -> bool:
    """Whether the recipe brings its own pairs (`data.pairs`) instead of judged samples."""
    return recipe.data.pairs is not None


class PairsStage:
    """Build chosen/rejected preference pairs (TRL format) from the judged samples, or convert `data.pairs`."""

    name = command = "pairs"
    per_round = True
    exclude: frozenset[str] = frozenset()

    def config(self, recipe) -> tuple[str, ...]:
        if _ready_pairs(recipe):
            return ("data.pairs", "data.format", "data.allow_outside_paths")
        return ("pairs", "sample.template")

    def reads(self, ctx: Context) -> list[Path]:
        if _ready_pairs(ctx.recipe):  # a missing file is reported by the reader, naming it
            source = Path(ctx.config.data.pairs)
            return [source] if source.exists() else []
        paths = ctx.paths
        return [paths.prompts, paths.samples, paths.verdicts, *template_files(ctx.config.sample.template)]

    def upstream(self, ctx: Context) -> dict[str, Any]:
        return {}

    def output(self, ctx: Context) -> Path:
        return ctx.paths.pairs

    def run(self, ctx: Context, fingerprint: str) -> dict[str, Any]:
        if _ready_pairs(ctx.recipe):
            from alignkit.pairs.imported import read_pairs

            data = ctx.config.data
            pairs, summary = read_pairs(data.pairs, ctx.paths.root / "images", data.format, data.allow_outside_paths)
            write_jsonl(ctx.paths.pairs, pairs)
            return summary

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
