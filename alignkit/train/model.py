"""Loading a VLM policy with its processor, and the LoRA configuration for preference training."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, ProcessorMixin

# Attention and MLP projections of Llama/Qwen-style language models (Qwen2-VL, Qwen2.5-VL, LLaVA).
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The language model's submodule in transformers 5 VLMs (`text_model` in Idefics-style models).
_LANGUAGE_MODEL = r"(language_model|text_model)"


def default_dtype() -> torch.dtype:
    """bf16 where the GPU supports it, else float32 (CPU bf16 is slow and lossy)."""
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def load_policy(name_or_path: str, dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a vision-language model and its processor from a hub id or a local directory."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype or default_dtype())
    processor = AutoProcessor.from_pretrained(name_or_path)
    return model, processor


def lora_config(
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
) -> LoraConfig:
    """A LoRA config on the language model's projections.

    A list of module names (default: `DEFAULT_TARGET_MODULES`) is matched inside the language model
    only: LLaVA's CLIP tower also has `q_proj`/`k_proj`/`v_proj`, and adapting the vision tower is
    not what preference tuning of the answers needs. A string is passed to PEFT as a regex as-is,
    for the rare case that should reach the vision tower or the projector.
    """
    from peft import LoraConfig

    if target_modules is None or isinstance(target_modules, list):
        names = "|".join(re.escape(n) for n in (target_modules or DEFAULT_TARGET_MODULES))
        target_modules = rf"(.*\.)?{_LANGUAGE_MODEL}\..*\.({names})"
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
