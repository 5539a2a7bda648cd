"""Sampling with plain transformers (AutoModelForImageTextToText), optionally with a PEFT adapter.

Slower than vLLM but needs nothing beyond transformers; it is also the reference the vLLM
backend is checked against. Requests are batched with left padding; one torch seed per call
makes a call's output depend only on its requests and seed.
"""

from __future__ import annotations

from typing import Any

import torch

from alignkit.models import load_adapter, load_policy, place
from alignkit.sample.base import Generation, Request, policy_name


class TransformersBackend:
    seeds_per_prompt = False  # one torch seed per call: a prompt's answers depend on its batch

    def __init__(
        self,
        model: str,
        adapter: str | None = None,
        *,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 8,
        dtype: str = "auto",
    ):
        hf_model, processor = load_policy(model, dtype=dtype)
        place(hf_model)  # this process's GPU (or the CPU), as accelerate sees it
        if adapter:
            hf_model = load_adapter(hf_model, adapter)
        settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size)
        self._attach(hf_model.eval(), processor, policy_name(model, adapter), **settings)

    @classmethod
    def in_process(cls, model, processor, policy: str, **settings: Any) -> TransformersBackend:
        """A backend over a model already in memory, e.g. a policy being trained (PPO rollouts): it
        samples from the model's current weights. `settings` are __init__'s max_new_tokens,
        temperature, top_p and batch_size; the caller puts the model in eval mode."""
        self = cls.__new__(cls)
        self._attach(model, processor, policy, **settings)
        return self

    def _attach(
        self, model, processor, policy: str, *, max_new_tokens: int, temperature: float, top_p: float, batch_size: int
    ) -> None:
        self.policy, self.model, self.processor = policy, model, processor
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size = batch_size
        self.processor.tokenizer.padding_side = "left"  # generation continues from the right edge
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    @torch.no_grad()
    def generate(self, requests: list[Request], num_samples: int, seed: int) -> list[list[Generation]]:
        out: list[list[Generation]] = []
        device = self.model.device
        gpus = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=gpus):  # seed locally; leave the caller's RNG alone
            torch.manual_seed(seed)
            for start in range(0, len(requests), self.batch_size):
                out += self._batch(requests[start : start + self.batch_size], num_samples)
        return out

    def _batch(self, requests: list[Request], k: int) -> list[list[Generation]]:
        texts = [self.processor.apply_chat_template(r.messages, add_generation_prompt=True) for r in requests]
        # one image list per prompt: a flat list reads as one prompt's images to some processors (Gemma 3)
        images = [list(r.images) for r in requests] if any(r.images for r in requests) else None
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        inputs = inputs.to(self.model.device)
        sampling = dict(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        seqs = self.model.generate(
            **inputs,
            **(sampling if self.temperature > 0 else dict(do_sample=False)),
            max_new_tokens=self.max_new_tokens,
            num_return_sequences=k,
            pad_token_id=self.processor.tokenizer.pad_token_id,
        )
        new = seqs[:, inputs["input_ids"].shape[1] :].tolist()
        gens = [self._generation(row) for row in new]
        return [gens[i * k : (i + 1) * k] for i in range(len(requests))]

    def _generation(self, row: list[int]) -> Generation:
        stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
        tokens = row if stop is None else row[: stop + 1]
        text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True)
        return Generation(text, len(tokens), "length" if stop is None else "stop", tokens)
