"""The `data` section (the prompts stage) and the synthetic world's settings, shared with `eval`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignkit.config import Section
from alignkit.data.formats import FORMATS


class SyntheticConfig(Section):
    world: Literal["shapes"] = "shapes"
    num_prompts: int = Field(16, ge=1)
    seed: int = 0
    tasks: list[Literal["describe", "count", "exists", "color"]] = ["describe", "count", "exists", "color"]


class DataConfig(Section):
    prompts: str | None = None
    """Prompts as jsonl, JSON, parquet, or a saved `datasets` directory (relative to the recipe file),
    or `hf:owner/name[:split]`: a Hub dataset already in the local `datasets` cache (never downloaded)."""
    format: Literal[("auto", *FORMATS)] = "auto"
    """The layout of `prompts` and `pairs` (`alignkit.data.formats`); `auto` tells it from the columns."""
    pairs: str | None = None
    """Ready preference pairs (an RLAIF-V, VLFeedback or TRL preference file, or a cached `hf:` dataset):
    the pairs stage converts them instead of pairing judged samples, so `stages: [pairs, train]` skips
    sample and judge."""
    synthetic: SyntheticConfig | None = None
    """Generate prompts from the synthetic shapes world instead (offline, deterministic)."""
    allow_outside_paths: bool = False
    """Let image paths in the prompts file point outside its directory (`../`, absolute paths);
    off by default, so a dataset cannot make a run read any file on the machine."""

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        sources = (self.prompts is not None) + (self.synthetic is not None)
        if sources > 1 or (sources == 0 and self.pairs is None):
            raise ValueError("set exactly one of data.prompts or data.synthetic (data.pairs alone: ready pairs)")
        return self
