"""The `score` stage: every sample scored by the critique reward model, and rm_* columns on the pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit.models.device import COMPUTE_KEYS
from alignkit.records import Prompt, Sample, read_records
from alignkit.reward.config import score_options
from alignkit.reward.stage import SCORE_KEYS
from alignkit.stage import Context, launch_files, settings_of, stage_key, template_files


class ScoreStage:
    """Score every sample with the critique reward model (rm_scores.jsonl) and add rm_margin, rm_chosen_score
    and rm_rejected_score to the pairs; prints the reward model's ACC / ACC+ against the judge."""

    name = command = "score"
    per_round = True
    # The scores do not depend on the number of processes (`alignkit.reward.score.score_shared`); an
    # accelerate config file may set the mixed precision (its bytes are in `reads`).
    exclude = frozenset({"launch.num_processes", "train.gradient_checkpointing"})  # scoring has no backward pass

    def distributed(self, recipe) -> bool:
        return True  # runs as launch.num_processes processes (alignkit.launch)

    def config(self, recipe) -> tuple[str, ...]:
        return (*SCORE_KEYS, "reward_model.overlong", "reward_model.checkpoint", "sample.template", "seed", "launch", *COMPUTE_KEYS)

    def _rm_dir(self, ctx: Context) -> Path:
        checkpoint = ctx.config.reward_model.checkpoint
        return Path(checkpoint) if checkpoint else ctx.paths.reward_model / "model"

    def reads(self, ctx: Context) -> list[Path]:
        return [ctx.paths.prompts, ctx.paths.samples, self._rm_dir(ctx) / "head.safetensors",
                *template_files(ctx.config.sample.template), *launch_files(ctx)]  # fmt: skip

    def upstream(self, ctx: Context) -> dict[str, Any]:
        from alignkit.reward.score import rm_pairs_digest

        # The pairs it annotates: a re-run of the pairs stage (which drops the rm_* columns) re-runs this.
        return {"pairs": rm_pairs_digest(ctx.paths.pairs) if ctx.paths.pairs.exists() else None}

    def output(self, ctx: Context) -> Path:
        return ctx.paths.rm_scores

    def run(self, ctx: Context, fingerprint: str) -> dict[str, Any]:
        """Runs in every process of a launch: all of them score, the main one writes."""
        from alignkit.models.device import ComputeSettings, process_state
        from alignkit.reward.score import annotate_pairs_file, score_samples
        from alignkit.sample.templates import load_template

        def score(fp: str) -> dict[str, Any]:
            prompts = read_records(ctx.paths.prompts, Prompt)
            template = load_template(ctx.config.sample.template)
            return score_samples(
                self._rm_dir(ctx), prompts, read_records(ctx.paths.samples, Sample),
                {p.prompt_id: template.render(p.question) for p in prompts}, ctx.paths.rm_scores,
                seed=ctx.config.seed, compute=ComputeSettings.of(ctx.config.train),
                overlong=ctx.config.reward_model.overlong, **score_options(ctx.config.reward_model),
            )  # fmt: skip

        # Scoring is cached apart from the pairs, so re-made pairs are annotated without re-scoring.
        settings = {"config": settings_of(self, ctx.recipe)}
        summary = ctx.step(stage_key("score:samples", ctx.round), settings, self.reads(ctx), ctx.paths.rm_scores, score)
        if ctx.paths.pairs.exists() and process_state().is_main_process:
            ev = annotate_pairs_file(ctx.paths.pairs, ctx.paths.rm_scores)
            ctx.console.print(
                f"reward model vs judge on {ev['num_pairs']} pairs: ACC {ev['acc']:.3f}  ACC+ {ev['acc_plus']:.3f}"
            )
            summary = {**summary, "pairs": ev}
        return summary

