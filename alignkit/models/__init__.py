"""The bottom layer for models: resolve a name, load a VLM with its processor, LoRA, merge, unwrap.

`loading` is what sample, train, reward and evaluate use; `tiny` builds the tiny offline models
that "tiny:..." names resolve to; `device` gives the loops their device, precision and processes
(accelerate). Importing this package does not import torch.
"""

from alignkit.models.loading import (
    DEFAULT_TARGET_MODULES,
    LANGUAGE_MODEL,
    default_dtype,
    load_adapter,
    load_policy,
    load_processor,
    lora_config,
    merge_adapter,
    place,
    quantization_4bit,
    resolve_model,
    unwrap,
)
from alignkit.models.tiny import BUILDERS, build_tiny_llava, build_tiny_qwen2_vl, default_cache_dir, tiny_model

__all__ = [
    "BUILDERS",
    "DEFAULT_TARGET_MODULES",
    "LANGUAGE_MODEL",
    "build_tiny_llava",
    "build_tiny_qwen2_vl",
    "default_cache_dir",
    "default_dtype",
    "load_adapter",
    "load_policy",
    "load_processor",
    "lora_config",
    "merge_adapter",
    "place",
    "quantization_4bit",
    "resolve_model",
    "tiny_model",
    "unwrap",
]
