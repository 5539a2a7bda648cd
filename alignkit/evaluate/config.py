"""The `eval` section: held-out evaluation before alignment and after every round."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignkit.config import Section
from alignkit.data.config import SyntheticConfig


class EvalConfig(Section):
    """Held-out evaluation of the policy before alignment and after every round."""

    benchmark: Literal["prompts", "pope", "coco_chair", "amber", "mmhal"] = "prompts"
    """`prompts`: eval.prompts or eval.synthetic. Or a published benchmark read from eval.path as
    it is distributed: `pope`, `coco_chair` (Object HalBench-style CHAIR on COCO), `amber`,
    `mmhal` (MMHal-Bench, scored by the recipe's judge endpoint with judges/mmhal.yaml)."""
    path: str | None = None
    """The benchmark's local directory (see alignkit/evaluate/benchmarks.py for each layout)."""
    images: str | None = None
    """The benchmark's image folder, when not where its layout puts it (e.g. your COCO val2014)."""
    max_questions: int | None = Field(None, ge=1)
    """Only the first N prompts (of each benchmark file: each POPE split, each AMBER part); null: all."""

    prompts: str | None = None
    """Held-out prompts with gold annotations (jsonl, parquet or a `datasets` directory)."""
    synthetic: SyntheticConfig | None = None
    """Or held-out prompts from the synthetic world (use a seed no training data uses)."""
    allow_outside_paths: bool = False
    """Let image paths in the prompts file point outside its directory (`../`, absolute paths);
    off by default, so a dataset cannot make a run read any file on the machine."""
    backend: Literal["transformers", "vllm"] = "transformers"
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    """0 is greedy decoding (the default, as in CHAIR and POPE); above 0 samples."""
    batch_size: int = Field(16, ge=1)
    vocabulary: str = "shapes"
    """The object vocabulary CHAIR reads answers and gold objects with: `shapes` (the synthetic
    world), `coco` (COCO's 80 categories with CHAIR's synonyms) or a YAML vocabulary file."""
    judge: bool = True
    """Also report the mean score of the recipe's judge on the answers."""

    @model_validator(mode="after")
    def _one_source(self) -> "EvalConfig":
        if self.benchmark != "prompts":
            if self.path is None:
                raise ValueError(f"eval.benchmark={self.benchmark} needs eval.path: the benchmark's local directory")
            if self.prompts is not None or self.synthetic is not None:
                raise ValueError(f"eval.benchmark={self.benchmark} reads eval.path: unset eval.prompts and eval.synthetic")
            if self.vocabulary != "shapes":
                raise ValueError(f"eval.vocabulary applies to eval.prompts/eval.synthetic; eval.benchmark="
                                 f"{self.benchmark} scores with its own object list")  # fmt: skip
            return self
        if self.path is not None or self.images is not None:
            raise ValueError("eval.path and eval.images name a benchmark's files: set eval.benchmark too")
        if (self.prompts is None) == (self.synthetic is None):
            raise ValueError("set exactly one of eval.prompts or eval.synthetic")
        return self
