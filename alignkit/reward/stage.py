"""The `reward_model` stage: the critique reward model (MM-RLHF) trained on this round's pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit.models.device import COMPUTE_KEYS
from alignkit.stage import Context, launch_files, model_identity, require
from alignkit.tracking import TRACKING_KEYS

# The `reward_model` keys that say how the model scores (critiques per answer, their length, ...).
SCORE_KEYS = tuple(f"reward_model.{k}" for k in ("num_critiques", "max_critique_tokens", "critique_temperature",
                                                  "score_batch_size"))  # fmt: skip


class RewardModelStage:
    """Train the critique reward model (recipe section `reward_model`) on the pairs, with the judge's
    rationales as critiques; writes reward_model/model and prints ACC / ACC+ on held-out prompts."""

    name = "reward_model"
    command = "train-rm"
    per_round = True
    exclude = frozenset({"reward_model.checkpoint", "reward_model.save_steps", "train.gradient_checkpointing",
                         *TRACKING_KEYS})  # fmt: skip

    def distributed(self, recipe) -> bool:
        return True  # runs as launch.num_processes processes (alignkit.launch)

    def config(self, recipe) -> tuple[str, ...]:
        # `launch` counts: the global batch is batch_size x grad_accum x num_processes, and an accelerate
        # config file may set the mixed precision (its bytes are in `reads`).
        return ("reward_model", "seed", "launch", "tracking", *COMPUTE_KEYS)

    def reads(self, ctx: Context) -> list[Path]:
        # the pairs count through `upstream`, without the columns the score stage adds
        return launch_files(ctx)

    def upstream(self, ctx: Context) -> dict[str, Any]:
        from alignkit.reward.score import rm_pairs_digest

        require([ctx.paths.pairs], self.name)
        model = ctx.config.reward_model.model
        policy = model_identity(model) if model else ctx.lineage.policy_identity(ctx.round)
        return {"pairs": rm_pairs_digest(ctx.paths.pairs), "model": policy}

    def output(self, ctx: Context) -> Path:
        return ctx.paths.reward_model

    def run(self, ctx: Context, fingerprint: str) -> dict[str, Any]:
        """Runs in every process of a launch: all of them train, the main one writes."""
        from alignkit.models.device import ComputeSettings, process_state
        from alignkit.reward.train import train_reward_model

        cfg, compute = ctx.config.reward_model, ComputeSettings.of(ctx.config.train)
        model = cfg.model or ctx.lineage.policy(ctx.round)
        summary = train_reward_model(ctx.paths.pairs, ctx.paths.reward_model, cfg, model=model, seed=ctx.config.seed,
                                     compute=compute, tracking=ctx.tracking(self.name))  # fmt: skip
        summary["mixed_precision"] = compute.precision()
        if "held_out" in summary and process_state().is_main_process:
            ev = summary["held_out"]
            ctx.console.print(
                f"reward model on held-out pairs: ACC {ev['acc']:.3f}  ACC+ {ev['acc_plus']:.3f} "
                f"({ev['num_pairs']} pairs, {ev['num_prompts']} prompts)"
            )
        return summary
