"""The seam between the sampling loop and its backends."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image


@dataclass
class Request:
    """One prompt, rendered: a chat turn (content list with image placeholders) and its images."""

    prompt_id: str
    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class Generation:
    text: str
    num_tokens: int
    finish_reason: str  # "stop" or "length"
    token_ids: list[int] = field(default_factory=list)  # the sampled tokens (eos included), for RL


class Backend(Protocol):
    """Draws `num_samples` answers per request. Same requests and seed give the same answers."""

    policy: str  # the model (and adapter) recorded on each Sample

    def generate(self, requests: list[Request], num_samples: int, seed: int) -> list[list[Generation]]: ...


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 31-bit seed from a base seed and labels (a chunk index, a prompt id)."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def policy_name(model: str, adapter: str | None) -> str:
    return f"{model}+{adapter}" if adapter else model
