"""The `judge` section: which judge scores the samples, and how it is reached."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignkit.config import Section


class JudgeConfig(Section):
    backend: Literal["reference", "openai"] = "reference"
    """`reference` scores against the prompts' gold annotations; `openai` calls an LLM judge."""
    rubric: str = "overall"
    """A built-in judge in judges/ (`overall`, `hallucination`, `correctness`, `claims`, `pairwise`) or a YAML path."""
    vocabulary: str = "shapes"
    """The object vocabulary the reference judge reads answers and gold objects with: `shapes`
    (the synthetic world), `coco` (COCO's 80 categories with CHAIR's synonyms) or a YAML file."""
    model: str | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself never goes here)."""
    concurrency: int = Field(8, ge=1)
    timeout: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0)
    image_max_side: int = Field(512, ge=16)
    rpm: float | None = Field(None, gt=0)
    """Cap on judge requests per minute (starts spaced evenly); null: no cap."""
    tpm: float | None = Field(None, gt=0)
    """Cap on judge tokens per minute (estimated before sending, corrected by the reply); null: no cap."""
    max_requests: int | None = Field(None, ge=1)
    """Stop the stage cleanly once this many requests were sent in one run (cached verdicts are free);
    what was received is kept, and a re-run with a higher cap goes on. Null: no cap."""
    max_cost: float | None = Field(None, gt=0)
    """Stop the stage cleanly once this much was spent in one run, priced with the judge file's
    `price` (which it then needs). Null: no cap."""
    num_judgments: int = Field(1, ge=1)
    """Judgments per sample; > 1 averages them (self-consistency) and reports their agreement."""
    calibration: str | None = None
    """Labelled preference data to measure the judge on (`alignkit judge-eval`; the file formats are in
    `alignkit.judge.calibration`); relative to the recipe file."""
    min_accuracy: float | None = Field(None, ge=0, le=1)
    """When set, `alignkit run` first measures the judge on `calibration` and stops, before any stage
    runs, if its accuracy is below this. Null: no gate."""

    @model_validator(mode="after")
    def _openai_needs_model(self) -> "JudgeConfig":
        if self.backend == "openai" and not self.model:
            raise ValueError("judge.model is required when judge.backend is 'openai'")
        if self.min_accuracy is not None and not self.calibration:
            raise ValueError("judge.min_accuracy needs judge.calibration (the labelled file to measure the judge on)")
        return self
