"""The seam between the sampling loop and its backends."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
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
    logprobs: list[float] = field(default_factory=list)  # the server's log-prob of each (asked for), for RL


class RejectedPrompts(Exception):
    """Some requests of a `generate` call were refused for their input (e.g. a prompt longer than the
    model's context, an image the server will not take); `generations` are the others' answers, in order."""

    def __init__(self, errors: dict[str, str], generations: list[list[Generation]]):
        super().__init__("; ".join(f"prompt {p}: {m}" for p, m in errors.items()))
        self.errors, self.generations = errors, generations

    def __reduce__(self):  # picklable with its fields (data-parallel workers send it back)
        return RejectedPrompts, (self.errors, self.generations)


def join_answers(calls: Iterable[Callable[[], list[list[Generation]]]]) -> list[list[Generation]]:
    """The answers of several `generate` calls on parts of a request list, in order; the requests
    they refused are raised together (`RejectedPrompts`) with the others' answers."""
    errors: dict[str, str] = {}
    generations: list[list[Generation]] = []
    for call in calls:
        try:
            generations += call()
        except RejectedPrompts as e:
            errors |= e.errors
            generations += e.generations
    if errors:
        raise RejectedPrompts(errors, generations)
    return generations


class Backend(Protocol):
    """Draws `num_samples` answers per request. Same requests and seed give the same answers.

    A backend that refuses some requests for their input raises `RejectedPrompts` with the answers
    to the rest, so nothing drawn (or paid for) is lost.
    """

    policy: str  # the model (and adapter) recorded on each Sample
    # True: a request's answers depend on its prompt id and the seed only, not on the other requests
    # of the call (vLLM, servers: a seed per prompt), so a resumed chunk asks for its missing prompts only.
    seeds_per_prompt: bool

    # Optionally `streams_answers = True`, with `generate(..., on_answers=fn)` calling `fn(prompt_id,
    # answers)` as each prompt's answers arrive (servers: every prompt is its own paid request).

    def generate(self, requests: list[Request], num_samples: int, seed: int) -> list[list[Generation]]: ...


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 31-bit seed from a base seed and labels (a chunk index, a prompt id)."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def policy_name(model: str, adapter: str | None) -> str:
    return f"{model}+{adapter}" if adapter else model
