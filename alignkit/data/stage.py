"""The `prompts` stage: the recipe's prompts (a file or the synthetic world) into the run directory."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from alignkit.data.config import DataConfig
from alignkit.data.formats import read_prompts
from alignkit.errors import StageInputError
from alignkit.records import Prompt, write_jsonl
from alignkit.stage import Context


def make_prompts(source: Any, out_dir: Path) -> list[Prompt]:
    """Prompts from a section with `prompts` (a file) or `synthetic` (the shapes world); images go
    under `out_dir`. Shared by the prompts stage and eval's held-out prompts."""
    if source.synthetic is not None:
        from alignkit.worlds.shapes import make_shapes_prompts

        syn = source.synthetic
        return make_shapes_prompts(out_dir, syn.num_prompts, seed=syn.seed, tasks=tuple(syn.tasks))
    if source.prompts is None:
        raise StageInputError("data.pairs gives pairs, not prompts: set data.prompts too (it may be the same "
                              "file), or run only the stages after them (stages: [pairs, train])")  # fmt: skip
    # eval's section has no `format`: its prompts are told apart by their columns.
    return read_prompts(source.prompts, out_dir / "images", source.allow_outside_paths, getattr(source, "format", "auto"))


def source_files(source: Any) -> list[Path]:
    """The user's prompts file or `datasets` directory, when the section names one that exists."""
    return [Path(source.prompts)] if source.prompts and Path(source.prompts).exists() else []


class PromptsStage:
    """Materialise the recipe's prompts (file or synthetic world) into the run directory."""

    name = command = "prompts"
    per_round = False
    exclude: frozenset[str] = frozenset()

    def config(self, recipe) -> tuple[str, ...]:
        return ("data", "levels")

    def reads(self, ctx: Context) -> list[Path]:
        return source_files(ctx.config.data)

    def upstream(self, ctx: Context) -> dict[str, Any]:
        return {}

    def output(self, ctx: Context) -> Path:
        return ctx.paths.prompts

    def run(self, ctx: Context, fingerprint: str) -> dict[str, Any]:
        data: DataConfig = ctx.config.data
        prompts = make_prompts(data, ctx.paths.root)
        summary: dict[str, Any] = {}
        if ctx.config.levels is not None:
            from alignkit.data.levels import annotate_levels

            summary["num_scored"] = len(prompts)
            prompts = annotate_levels(prompts, ctx.config.levels)
            summary["per_level"] = {str(k): n for k, n in sorted(Counter(p.level for p in prompts).items())}
        write_jsonl(ctx.paths.prompts, prompts)
        return {"num_prompts": len(prompts), **summary}
