"""The `pairs` section: how judged samples become preference pairs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignkit.config import Section


class PairsConfig(Section):
    strategy: Literal["best_worst", "threshold"] = "best_worst"
    min_margin: float = Field(0.0, ge=0)
