"""The LLM judge backend: any OpenAI-compatible chat-completions server, images included.

Each sample becomes one request (system + user prompt from the judge file, the prompt's images
as data URLs) asking for the verdict as strict structured output. Servers that ignore
`response_format` still work: the first JSON object in the reply is used. Transport faults
(429 with Retry-After, 5xx, timeouts) are retried by the openai client itself; a verdict that
fails to parse or validate is asked again, and after `max_retries` re-asks it is recorded as
failed (no score), never dropped and never scored 0.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import openai

from alignkit.judge.cache import VerdictCache, cache_key
from alignkit.judge.progress import Tally
from alignkit.judge.rubric import RATIONALE, JudgeError, Rubric
from alignkit.records import Prompt, Sample, Verdict, load_image


@lru_cache(maxsize=64)  # K samples of one prompt share its images
def image_data_url(path: str, max_side: int = 512) -> str:
    """An image as a base64 data URL, downscaled so its longest side is at most `max_side`.

    JPEG files stay JPEG (photos); everything else is sent as lossless PNG. Encoding is
    deterministic, so the same file always yields the same URL (and cache key).
    """
    try:
        img = load_image(path)
    except OSError as e:
        raise JudgeError(f"cannot read image {path}: {e}") from None
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    jpeg = Path(path).suffix.lower() in (".jpg", ".jpeg")
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if jpeg else "PNG", **({"quality": 90} if jpeg else {}))
    mime = "image/jpeg" if jpeg else "image/png"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_messages(rubric: Rubric, prompt: Prompt, sample: Sample, image_max_side: int) -> list[dict[str, Any]]:
    """The chat messages judging `sample`: system text, then the images and the user text."""
    system, user = rubric.render(
        question=prompt.question,
        answer=sample.answer,
        response=sample.text,
        reference_answer=prompt.reference_answer,
        objects=prompt.objects,
    )
    try:
        images = [
            {"type": "image_url", "image_url": {"url": image_data_url(p, image_max_side)}} for p in prompt.images
        ]
    except JudgeError as e:
        raise JudgeError(f"prompt {prompt.prompt_id}: {e}") from None
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": [*images, {"type": "text", "text": user}]},
    ]


def parse_verdict(text: str) -> dict[str, Any]:
    """The first JSON object in a reply: the whole text, or one inside prose or ```json fences."""
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch == "{":
            try:
                obj, _ = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    snippet = text.strip().replace("\n", " ")[:120]
    raise JudgeError(f"no JSON object in the reply {snippet!r}")


def api_key_from_env(api_key_env: str) -> str:
    """The API key from the environment; the error names the variable, never a value."""
    key = os.environ.get(api_key_env)
    if not key:
        raise JudgeError(
            f"judge.backend=openai needs an API key in the environment variable {api_key_env}, which is "
            "not set (for a local server that needs none, set it to any value)"
        )
    return key


class OpenAIJudge:
    """Judges samples over an OpenAI-compatible API with a concurrency limit and a verdict cache."""

    def __init__(
        self,
        rubric: Rubric,
        *,
        model: str,
        base_url: str | None,
        api_key_env: str,
        concurrency: int,
        timeout: float,
        max_retries: int,
        image_max_side: int,
    ):
        api_key_from_env(api_key_env)  # fail before any output is touched
        self.rubric, self.model, self.base_url, self.api_key_env = rubric, model, base_url, api_key_env
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.image_max_side = image_max_side
        self.judge_name = f"openai/{rubric.name}/{model}"
        self.response_format = {
            "type": "json_schema",
            "json_schema": {"name": _schema_name(rubric.name), "schema": rubric.schema, "strict": True},
        }

    async def run(
        self,
        items: list[tuple[Prompt, Sample]],
        on_verdict: Callable[[Verdict], None],
        tally: Tally,
        cache: VerdictCache | None = None,
    ) -> None:
        """Judge every (prompt, sample), handing each verdict to `on_verdict` as soon as it is known."""
        sem = asyncio.Semaphore(self.concurrency)
        client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=api_key_from_env(self.api_key_env),
            max_retries=self.max_retries,
            timeout=self.timeout,
        )

        async def one(prompt: Prompt, sample: Sample) -> None:
            # The whole sample under the semaphore: only `concurrency` message sets (images
            # included) are built and held at a time, however many samples there are.
            async with sem:
                verdict, cached = await self._judge(client, cache, prompt, sample, tally)
            on_verdict(verdict)
            tally.add(verdict, cached=cached)

        try:
            await asyncio.gather(*(one(p, s) for p, s in items))
        finally:
            await client.close()

    async def _judge(
        self, client: openai.AsyncOpenAI, cache: VerdictCache | None, prompt: Prompt, sample: Sample, tally: Tally
    ) -> tuple[Verdict, bool]:
        """(verdict, whether it came from the cache) for one sample."""
        messages = build_messages(self.rubric, prompt, sample, self.image_max_side)
        sampling = dict(self.rubric.sampling)
        key = cache_key(self.rubric.content_hash, self.model, sampling, messages)
        if cache is not None and (hit := cache.get(key)) is not None:
            return self._ok(prompt, sample, hit[0]), True

        attempts = 1 + self.max_retries
        problem = ""
        for _ in range(attempts):
            try:
                tally.requests += 1
                reply = await client.chat.completions.create(
                    model=self.model, messages=messages, response_format=self.response_format, **sampling
                )
            except openai.APIError as e:
                return self._failed(prompt, sample, _api_failure(e, self.timeout, self.max_retries)), False
            usage = reply.usage
            prompt_tokens = usage.prompt_tokens if usage else 0
            completion_tokens = usage.completion_tokens if usage else 0
            tally.prompt_tokens += prompt_tokens
            tally.completion_tokens += completion_tokens
            try:
                verdict = parse_verdict((reply.choices[0].message.content if reply.choices else None) or "")
                self.rubric.validate(verdict)
            except JudgeError as e:
                problem = str(e)
                continue
            if cache is not None:  # cache first: a kill before the jsonl write still re-asks nothing
                cache.put(key, verdict, prompt_tokens, completion_tokens)
            return self._ok(prompt, sample, verdict), False
        return self._failed(prompt, sample, f"invalid_verdict: {problem} (after {attempts} attempts)"), False

    def _ok(self, prompt: Prompt, sample: Sample, verdict: dict[str, Any]) -> Verdict:
        scores = self.rubric.normalise(verdict)
        return Verdict(
            sample.sample_id, prompt.prompt_id, self.judge_name, "ok", self.rubric.combine(scores), scores,
            str(verdict[RATIONALE]),
        )  # fmt: skip

    def _failed(self, prompt: Prompt, sample: Sample, error: str) -> Verdict:
        return Verdict(sample.sample_id, prompt.prompt_id, self.judge_name, "failed", None, error=error)


def _api_failure(e: openai.APIError, timeout: float, max_retries: int) -> str:
    """A failed request as 'kind: detail' (the kind is what the summary counts)."""
    after = f"after {max_retries} retries"
    if isinstance(e, openai.APITimeoutError):
        return f"timeout: no reply within {timeout:g}s, {after}"
    if isinstance(e, openai.APIConnectionError):
        return f"connection_error: {e}, {after}"
    if isinstance(e, openai.APIStatusError):
        detail = f"HTTP {e.status_code} {str(e.message)[:200]}"
        if e.status_code == 429:
            return f"rate_limited: {detail}, {after}"
        if e.status_code >= 500:
            return f"server_error: {detail}, {after}"
        return f"api_error: {detail}"
    return f"api_error: {str(e)[:200]}"


def _schema_name(name: str) -> str:
    """response_format names allow [a-zA-Z0-9_-] only."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:64] or "verdict"
