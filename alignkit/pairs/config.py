"""The `pairs` section: how judged samples become preference pairs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignkit.config import Section


class PairsConfig(Section):
    strategy: Literal["best_worst", "threshold", "rlaifv"] = "best_worst"
    """`best_worst`: one pair per prompt; `threshold`: every pair whose margin reaches `min_margin`;
    `rlaifv`: RLAIF-V's construction (threshold pairs, at most `max_pairs_per_prompt` drawn per
    prompt, identical texts dropped, then the length-balance filter)."""
    min_margin: float = Field(0.0, ge=0)
    """The score gap a pair needs (any positive gap at 0)."""
    max_pairs_per_prompt: int = Field(2, ge=1)
    """`rlaifv` only: pairs drawn per prompt (RLAIF-V's `--sample_num`, default 2)."""
    min_length_ratio: float | Literal["auto"] | None = "auto"
    """`rlaifv` only: drop pairs whose chosen/rejected word-count ratio is below this; `auto` picks the
    bound that best equalises mean chosen and rejected lengths, as RLAIF-V does; null: no lower bound."""
    max_length_ratio: float | None = Field(None, gt=0)
    """`rlaifv` only: drop pairs whose chosen/rejected word-count ratio is above this; null: no bound."""

    @model_validator(mode="after")
    def _bounds(self) -> PairsConfig:
        low = self.min_length_ratio
        if isinstance(low, float) and low < 0:
            raise ValueError(f"min_length_ratio must be >= 0, got {low}")
        if isinstance(low, float) and self.max_length_ratio is not None and low > self.max_length_ratio:
            raise ValueError(f"min_length_ratio ({low}) is above max_length_ratio ({self.max_length_ratio})")
        return self
