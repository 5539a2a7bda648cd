"""The `reward_model` stage: the critique reward model (MM-RLHF) trained on this round's pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit.reward.config import RewardModelConfig
from alignkit.stage import Context, model_identity, require

# The `reward_model` keys that say how the model scores (critiques per answer, their length, ...).
SCORE_KEYS = tuple(f"reward_model.{k}" for k in ("num_critiques", "max_critique_tokens", "critique_temperature",
                                                  "score_batch_size"))  # fmt: skip


def score_options(cfg: RewardModelConfig) -> dict[str, Any]:
    """`score_answers`' keyword arguments from the section."""
    return {"num_critiques": cfg.num_critiques, "max_new_tokens": cfg.max_critique_tokens,
            "temperature": cfg.critique_temperature, "batch_size": cfg.score_batch_size}  # fmt: skip


class RewardModelStage:
    """Train the critique reward model (recipe section `reward_model`) on the pairs, with the judge's
    rationales as critiques; writes reward_model/model and prints ACC / ACC+ on held-out prompts."""

    name = "reward_model"
    command = "train-rm"
    per_round = True
    exclude = frozenset({"reward_model.checkpoint"})  # the score stage's, not the training's

    def config(self, recipe) -> tuple[str, ...]:
        return ("reward_model", "seed")

    def reads(self, ctx: Context) -> list[Path]:
        return []  # the pairs count through `upstream`, without the columns the score stage adds

    def upstream(self, ctx: Context) -> dict[str, Any]:
        from alignkit.reward.score import rm_pairs_digest

        require([ctx.paths.pairs], self.name)
        model = ctx.config.reward_model.model
        policy = model_identity(model) if model else ctx.lineage.policy_identity(ctx.round)
        return {"pairs": rm_pairs_digest(ctx.paths.pairs), "model": policy}

    def output(self, ctx: Context) -> Path:
        return ctx.paths.reward_model

    def run(self, ctx: Context, fingerprint: str) -> dict[str, Any]:
        from alignkit.reward.losses import LossWeights
        from alignkit.reward.train import train_reward_model

        cfg = ctx.config.reward_model
        summary = train_reward_model(
            ctx.paths.pairs, ctx.paths.reward_model, model=cfg.model or ctx.lineage.policy(ctx.round),
            finetune=cfg.finetune, learning_rate=cfg.learning_rate, max_steps=cfg.max_steps,
            batch_size=cfg.batch_size,
            weights=LossWeights(cfg.critique_weight, cfg.margin_weight, cfg.tie_weight, cfg.center_weight),
            use_critiques=cfg.use_critiques, eval_fraction=cfg.eval_fraction, lora_r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=cfg.target_modules,
            seed=ctx.config.seed, score_options=score_options(cfg),
        )  # fmt: skip
        if "held_out" in summary:
            ev = summary["held_out"]
            ctx.console.print(
                f"reward model on held-out pairs: ACC {ev['acc']:.3f}  ACC+ {ev['acc_plus']:.3f} "
                f"({ev['num_pairs']} pairs, {ev['num_prompts']} prompts)"
            )
        return summary
