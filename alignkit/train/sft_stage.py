"""The `sft` stage: supervised fine-tuning before preference training; its model becomes the policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit.records import write_jsonl
from alignkit.stage import Context, model_identity, template_files


class SftStage:
    """Supervised fine-tuning on image+text prompt/completion conversations (the recipe's `sft` section);
    the model in sft/model becomes the policy the later stages sample and train."""

    name = command = "sft"
    per_round = False
    exclude = frozenset({"sft.save_steps"})

    def config(self, recipe) -> tuple[str, ...]:
        return ("sft", "policy.model", "sample.template", "seed")

    def reads(self, ctx: Context) -> list[Path]:
        cfg = ctx.config.sft
        if cfg is None:
            from alignkit.errors import StageInputError

            raise StageInputError("stage 'sft' needs an `sft` section in the recipe")
        return [*([Path(cfg.data)] if cfg.data else []), *template_files(ctx.config.sample.template)]

    def upstream(self, ctx: Context) -> dict[str, Any]:
        return {"model": model_identity(ctx.config.policy.model)}

    def output(self, ctx: Context) -> Path:
        return ctx.paths.sft / "model"

    def run(self, ctx: Context, fingerprint: str) -> dict[str, Any]:
        from alignkit.train.sft import train_sft

        cfg, sft_dir = ctx.config.sft, ctx.paths.sft
        data_file = Path(cfg.data) if cfg.data else sft_dir / "data.jsonl"
        summary: dict[str, Any] = {}
        if cfg.synthetic is not None:
            from alignkit.data.worlds.shapes import make_shapes_prompts, sft_examples
            from alignkit.sample.templates import load_template

            syn = cfg.synthetic
            prompts = make_shapes_prompts(sft_dir, syn.num_examples, seed=syn.seed)
            rows = sft_examples(prompts, load_template(ctx.config.sample.template), syn.error_rate, seed=syn.seed)
            write_jsonl(data_file, rows)
            summary["hallucinated_share"] = sum(r["hallucinated"] for r in rows) / len(rows)
        model_dir = train_sft(data_file, sft_dir, cfg, model=ctx.config.policy.model, seed=ctx.config.seed)
        return summary | {"model": str(model_dir)}
