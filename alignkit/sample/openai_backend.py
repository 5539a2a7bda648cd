"""Sampling from any OpenAI-compatible chat-completions server (e.g. `vllm serve MODEL`).

One request per prompt asks for all K answers (`n=K`) with the prompt's own seed, its images as
lossless PNG data URLs (the pixels the local backends see). A server that ignores `n` answers
fewer choices; the missing ones are asked one request each, with a seed per sample index (a
seeded server would otherwise repeat its one answer). Seeds reproduce only on servers that honour
them. The client, its retries, the concurrency limit and rate caps are the judge's
(`alignkit.openai_client`). A LoRA adapter cannot be loaded from here: the server must serve it
(`vllm serve BASE --enable-lora --lora-modules NAME=PATH`) and `model_name` must be NAME.
With `logprobs`, each request also asks for per-token logprobs, to count each answer's tokens
exactly (usage counts the K answers together); each answer keeps them (`Generation.logprobs`).
With `token_ids` (vLLM's servers only), each answer carries the ids of its sampled tokens (vLLM's
`return_token_ids`), for RL. A prompt the server refuses for its input
(HTTP 400/413/422, e.g. longer than the model's context) is skipped and listed in the stage summary.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import openai
from openai.types.chat import ChatCompletion

from alignkit.errors import SampleError, SetupError
from alignkit.openai_client import BadReply, ChatClient, data_url
from alignkit.sample.base import Generation, RejectedPrompts, Request, derive_seed, policy_name
from alignkit.throttle import estimate_tokens

# Statuses that refuse a request for its input (bad request, payload too large, unprocessable): the
# prompt is skipped and listed. Others (auth, unknown model, server errors) stop the stage.
REFUSED_INPUT = (400, 413, 422)


class OpenAIBackend:
    seeds_per_prompt = True
    streams_answers = True  # each prompt's answers are handed over as they arrive (`on_answers`)

    def __init__(
        self,
        model_name: str,
        base_url: str | None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        adapter: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        concurrency: int = 8,
        timeout: float = 600.0,
        max_retries: int = 3,
        rpm: float | None = None,
        tpm: float | None = None,
        logprobs: bool = False,
        token_ids: bool = False,
    ):
        """`adapter` only labels the samples' policy: the server must already serve it as `model_name`.
        `logprobs` asks for per-token logprobs (exact per-answer token counts; not every server has them);
        `token_ids` for the sampled token ids (vLLM's `return_token_ids`)."""
        self.conn = ChatClient(
            base_url, api_key_env, setting="sample.backend=openai", concurrency=concurrency, timeout=timeout,
            max_retries=max_retries, rpm=rpm, tpm=tpm, error=SampleError,
        )  # fmt: skip
        self.model_name, self.policy = model_name, policy_name(model_name, adapter)
        self.sampling = {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        if logprobs:
            self.sampling["logprobs"] = True
        if token_ids:
            self.sampling["return_token_ids"] = True

    def generate(
        self, requests: list[Request], num_samples: int, seed: int,
        on_answers: Callable[[str, list[Generation]], None] | None = None,
    ) -> list[list[Generation]]:  # fmt: skip
        """As `Backend.generate`; `on_answers(prompt_id, answers)` is called as each prompt's answers arrive."""
        return asyncio.run(self._generate(requests, num_samples, seed, on_answers))

    async def _generate(self, requests: list[Request], k: int, seed: int, on_answers) -> list[list[Generation]]:
        async def one(r: Request) -> list[Generation]:
            gens = await self._prompt(r, k, derive_seed(seed, r.prompt_id))
            if on_answers is not None:
                on_answers(r.prompt_id, gens)
            return gens

        async with self.conn:
            results = await asyncio.gather(*(one(r) for r in requests), return_exceptions=True)
        failed = [x for x in results if isinstance(x, BaseException)]
        if unexpected := next((x for x in failed if not isinstance(x, RejectedPrompts)), None):
            raise unexpected
        if failed:  # the server refused these prompts' input: keep the others' answers (paid for)
            errors = {p: m for x in failed for p, m in x.errors.items()}
            raise RejectedPrompts(errors, [x for x in results if not isinstance(x, BaseException)])
        return results

    async def _prompt(self, request: Request, k: int, seed: int) -> list[Generation]:
        """K answers for one prompt: one request with n=K, then one per answer the server left out."""
        messages = _messages(request)
        gens = await self._ask(request.prompt_id, messages, k, seed)
        extra = await asyncio.gather(
            *(self._ask(request.prompt_id, messages, 1, derive_seed(seed, i)) for i in range(len(gens), k))
        )
        return (gens + [g for gs in extra for g in gs])[:k]

    async def _ask(self, prompt_id: str, messages: list[dict[str, Any]], n: int, seed: int) -> list[Generation]:
        body = {"model": self.model_name, "messages": messages, "n": n, "seed": seed, **self.sampling}
        for attempt in range(1 + self.conn.max_retries):
            try:
                async with self.conn.slot:
                    reply = await self.conn.chat(body, estimate_tokens(messages, n * self.sampling["max_tokens"]))
            except BadReply as e:  # an unusable HTTP 200 reply: asked again, then this prompt fails alone
                problem = f"bad_reply: {e} (after {attempt + 1} attempts)"
                continue
            except openai.APIError as e:
                failure = self.conn.failure(e)
                if isinstance(e, openai.APIStatusError) and e.status_code in REFUSED_INPUT:
                    # `from None`: the server's own text (which may quote the key) stays out of any traceback
                    raise RejectedPrompts({prompt_id: f"the server refused it: {failure}"}, []) from None
                server = f"model {self.model_name!r} at {self.conn.base_url or 'the OpenAI API'}"
                raise SetupError(f"prompt {prompt_id}: sampling request to {server} failed: {failure} "
                                 "(check sample.base_url, sample.model_name and the server)") from None  # fmt: skip
            if not reply.choices:
                problem = f"bad_reply: the server answered no choices (after {attempt + 1} attempts)"
                continue
            return _generations(reply, self.sampling["max_tokens"])
        raise RejectedPrompts({prompt_id: problem}, [])


def _messages(request: Request) -> list[dict[str, Any]]:
    """The request's chat turns with each image placeholder replaced by its image as a data URL."""
    images = iter(request.images)
    return [
        {**m, "content": [
            {"type": "image_url", "image_url": {"url": data_url(next(images))}} if part["type"] == "image" else part
            for part in m["content"]
        ]}
        for m in request.messages
    ]  # fmt: skip


def _generations(reply: ChatCompletion, max_tokens: int) -> list[Generation]:
    """One Generation per choice, with token counts from its token ids or logprobs, or else the reply's usage.

    A choice's per-token logprobs (asked for with `logprobs`) give its exact count. Otherwise:
    `usage` counts all choices together. With one choice that is its count; with several, a
    truncated choice used exactly `max_tokens` and the rest is split over the others in proportion
    to their text length (an estimate).
    """
    choices = sorted(reply.choices, key=lambda c: c.index)
    texts = [c.message.content or "" for c in choices]
    cut = [c.finish_reason == "length" for c in choices]
    total = reply.usage.completion_tokens if reply.usage else 0
    ids = [getattr(c, "token_ids", None) or [] for c in choices]  # vLLM's `return_token_ids`
    if all(ids):
        counts = [len(i) for i in ids]
    elif all(c.logprobs and c.logprobs.content is not None for c in choices):
        counts = [len(c.logprobs.content) for c in choices]
    elif len(choices) == 1:
        counts = [total]
    else:
        rest = max(total - max_tokens * sum(cut), 0)
        chars = sum(len(t) for t, c in zip(texts, cut) if not c) or 1
        counts = [max_tokens if c else round(rest * len(t) / chars) for t, c in zip(texts, cut)]
    logprobs = [[t.logprob for t in c.logprobs.content] if c.logprobs and c.logprobs.content else [] for c in choices]
    return [Generation(t, n, "length" if c else "stop", i, lp)
            for t, n, c, i, lp in zip(texts, counts, cut, ids, logprobs)]  # fmt: skip
