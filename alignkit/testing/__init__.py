"""Offline test fixtures: the synthetic shapes world and tiny VLMs built from random weights."""

from alignkit.testing.shapes import describe_objects, make_shapes_prompts, write_prompts
from alignkit.testing.tiny_models import build_tiny_llava, build_tiny_qwen2_vl, resolve_model, tiny_model

__all__ = [
    "build_tiny_llava",
    "build_tiny_qwen2_vl",
    "describe_objects",
    "make_shapes_prompts",
    "resolve_model",
    "tiny_model",
    "write_prompts",
]
