"""The `reward_model` section: the critique reward model's training (`reward_model` stage) and scoring (`score` stage)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignkit.config import Section


class RewardModelConfig(Section):
    """The critique reward model (MM-RLHF): stage `reward_model` trains it, stage `score` uses it."""

    model: str | None = None
    """Backbone VLM to train from (default: policy.model)."""
    finetune: Literal["lora", "full"] = "lora"
    learning_rate: float = Field(1e-4, gt=0)
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    """Pairs per process and micro-batch (each pair is two sequences); a step takes batch_size ×
    grad_accum × launch.num_processes pairs, and any split of the same global batch takes the same step."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per step (gradient accumulation)."""
    critique_weight: float = Field(1.0, ge=0)
    """Weight of the critique token cross-entropy."""
    margin_weight: float = Field(0.0, ge=0)
    """Bradley-Terry margin: -log sigmoid(r_c - r_r - margin_weight * judge margin); 0 is plain BT."""
    tie_weight: float = Field(1.0, ge=0)
    """Weight of (r_c - r_r)^2 on tied pairs (margin 0)."""
    center_weight: float = Field(0.01, ge=0)
    """Reward centering, center_weight * mean((r_c + r_r)^2); 0.01 as in the MM-RLHF recipe."""
    use_critiques: bool = True
    """Train critique generation on the judge's rationales; false trains the score only."""
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of prompts held out to report ACC / ACC+ after training."""
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None
    num_critiques: int = Field(1, ge=0)
    """Critiques per answer when scoring (1: greedy; more: sampled and averaged; 0: no critique)."""
    max_critique_tokens: int = Field(64, ge=1)
    critique_temperature: float = Field(1.0, gt=0)
    score_batch_size: int = Field(8, ge=1)
    save_steps: int = Field(50, ge=1)
    """Checkpoint training every this many steps (a killed run resumes from the last one)."""
    overlong: Literal["stop", "skip"] = "stop"
    """A pair (training: with its critiques) or an answer (scoring: with the critique request and
    max_critique_tokens) longer than the model's context, image tokens counted, is never cut: `stop`
    stops the stage naming every such id, `skip` leaves them out (counted in the stage summary)."""
    checkpoint: str | None = None
    """Score with this reward model directory instead of the one the `reward_model` stage trains."""


def score_options(cfg: RewardModelConfig) -> dict[str, int | float]:
    """`score_answers`' keyword arguments from the section: how the model scores (critiques, their
    length, batch). Stages pass their view of the section, which lets it read only these keys."""
    return {"num_critiques": cfg.num_critiques, "max_new_tokens": cfg.max_critique_tokens,
            "temperature": cfg.critique_temperature, "batch_size": cfg.score_batch_size}  # fmt: skip
