"""The LLM judge backend: any OpenAI-compatible chat-completions server, images included.

Each judgment is one request (system + user prompt from the judge file, the prompt's images as
data URLs) asking for the verdict as strict structured output. Servers that ignore
`response_format` still work: the first JSON object in the reply is used. Transport faults are
retried by the openai client itself, which we rely on (and test); the client, its retry settings,
the concurrency limit and the per-minute caps are shared with the sampler (`alignkit.openai_client`).
A verdict that fails to parse or validate is asked again, and after `max_retries` re-asks it is
recorded as failed (no score), never dropped and never scored 0.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Awaitable, Callable

import openai

from alignkit.errors import SetupError, SpendCapReached
from alignkit.judge.cache import VerdictCache, cache_key
from alignkit.judge.progress import Tally
from alignkit.judge.rubric import RATIONALE, JudgeError, Rubric
from alignkit.openai_client import BadReply, ChatClient, data_url, scrub
from alignkit.records import Prompt, Sample, Verdict, load_image, to_dict
from alignkit.throttle import estimate_tokens


def image_data_url(path: str, max_side: int = 512) -> str:
    """An image as a base64 data URL, downscaled so its longest side is at most `max_side`.

    JPEG files stay JPEG (photos); everything else is sent as lossless PNG. Encoding is
    deterministic, so the same file always yields the same URL (and cache key). The encoding is
    remembered by path and file stats: a file rewritten under the same name is encoded anew.
    """
    try:
        stat = os.stat(path)
    except OSError as e:
        raise JudgeError(f"cannot read image {path}: {e}") from None
    return _encoded(path, max_side, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=64)  # K samples of one prompt share its images
def _encoded(path: str, max_side: int, mtime_ns: int, size: int) -> str:
    try:
        img = load_image(path)
    except OSError as e:
        raise JudgeError(f"cannot read image {path}: {e}") from None
    return data_url(img, max_side, jpeg=Path(path).suffix.lower() in (".jpg", ".jpeg"))


def build_messages(rubric: Rubric, prompt: Prompt, image_max_side: int, **untrusted: str) -> list[dict[str, Any]]:
    """The chat messages of one judgment: system text, then the images and the user text.

    `untrusted` holds the answers being judged (`answer`, `response`; `answer_a` ... for pairwise)."""
    system, user = rubric.render(
        question=prompt.question, reference_answer=prompt.reference_answer, objects=prompt.objects, **untrusted
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
    """The verdict in a reply: the whole text, or the JSON object inside prose or ```json fences.

    A server that ignores `response_format` may write prose around its verdict, or quote a
    verdict-like object from the answer under judgement first: the verdict is the last complete
    object, and a reply holding different objects is no verdict at all (it cannot be told which is
    the judge's)."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    i = text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = text.find("{", end)
    if not found:
        snippet = text.strip().replace("\n", " ")[:120]
        raise JudgeError(f"no JSON object in the reply {snippet!r}")
    if any(obj != found[-1] for obj in found):
        raise JudgeError(f"the reply holds {len(found)} different JSON objects: which is the verdict is unclear")
    return found[-1]


@dataclass(frozen=True)
class Judgment:
    """One request's outcome: a validated verdict, or the reason it failed ('kind: detail')."""

    verdict: dict[str, Any] | None
    error: str | None = None
    cached: bool = False


# HTTP statuses that mean the configuration is wrong (key, permission, model or URL), not this request.
CONFIGURATION_ERRORS = (401, 403, 404)
# The circuit breaker: the stage stops when this many of the last BREAKER_WINDOW requests failed.
BREAKER_WINDOW, BREAKER_FAILURES = 20, 16


class OpenAIJudge:
    """Asks an OpenAI-compatible API for verdicts with a concurrency limit, rate caps and a cache."""

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
        rpm: float | None = None,
        tpm: float | None = None,
        max_requests: int | None = None,
        max_cost: float | None = None,
    ):
        self.conn = ChatClient(
            base_url, api_key_env, setting="judge.backend=openai", concurrency=concurrency, timeout=timeout,
            max_retries=max_retries, rpm=rpm, tpm=tpm, error=JudgeError,
        )  # fmt: skip
        self.rubric, self.model, self.timeout, self.max_retries = rubric, model, timeout, max_retries
        self.image_max_side = image_max_side
        self.judge_name = f"openai/{rubric.name}/{model}"
        self.response_format = {
            "type": "json_schema",
            "json_schema": {"name": _schema_name(rubric.name), "schema": rubric.schema, "strict": True},
        }
        self.cache: VerdictCache | None = None
        self.tally = Tally()
        self.recent: deque[str | None] = deque(maxlen=BREAKER_WINDOW)  # the last requests' errors (None: ok)
        self.max_requests, self.max_cost = max_requests, max_cost
        if max_cost is not None and rubric.price is None:
            raise JudgeError(f"judge.max_cost needs a `price` in the judge file {rubric.path}")

    def session(self, cache: VerdictCache | None, tally: Tally) -> OpenAIJudge:
        """Set this run's cache and tally; use as `async with judge.session(cache, tally):` around `ask`."""
        self.cache, self.tally = cache, tally
        return self

    async def __aenter__(self) -> OpenAIJudge:
        await self.conn.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.__aexit__(*exc)

    async def ask(self, prompt: Prompt, repetition: int = 0, **untrusted: str) -> Judgment:
        """One judgment of `untrusted` (the answers) for `prompt`; `repetition` > 0 gets its own cache key.

        Messages are built under the concurrency limit, so only `concurrency` message sets (images
        included) are held at a time, however many judgments are queued.
        """
        async with self.conn.slot:
            judgment = await self._ask(prompt, repetition, untrusted)
        self.tally.add(judgment.verdict is not None, judgment.cached)
        return judgment

    async def _ask(self, prompt: Prompt, repetition: int, untrusted: dict[str, str]) -> Judgment:
        messages = build_messages(self.rubric, prompt, self.image_max_side, **untrusted)
        sampling = {k: v for k, v in self.rubric.sampling.items() if k != "retry_max_tokens"}
        retry_tokens = self.rubric.sampling.get("retry_max_tokens")
        key = cache_key(self.rubric.request_hash, self.model, sampling, messages, repetition)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            try:  # checked against the judge file as it is now (a score's range may have changed)
                self.rubric.validate(hit[0])
                return Judgment(hit[0], cached=True)
            except JudgeError:
                pass  # asked again below, and the new verdict replaces it

        attempts = 1 + self.max_retries
        estimate = estimate_tokens(messages, int(sampling.get("max_tokens", 512)))
        problem = ""
        for _ in range(attempts):
            self._check_caps()
            try:
                self.tally.requests += 1
                body = {"model": self.model, "messages": messages, "response_format": self.response_format, **sampling}
                reply = await self.conn.chat(body, estimate)
            except openai.APIError as e:
                failure = self.conn.failure(e)
                if isinstance(e, openai.APIStatusError) and e.status_code in CONFIGURATION_ERRORS:
                    # a bad key, model or URL fails every request alike: stop at the first, pay for no more
                    raise SetupError(
                        f"the judge server refused the request ({failure}); check judge.base_url "
                        f"({self.conn.base_url or 'the OpenAI API'}), judge.model ({self.model!r}) and the key in "
                        f"{self.conn.api_key_env}. Verdicts already received are kept: fix it and run again"
                    ) from None
                return self._breaker(Judgment(None, failure))
            except BadReply as e:  # an unusable HTTP 200 reply: asked again, like an unusable verdict
                problem = f"bad_reply: {scrub(str(e), None)}"
                continue
            usage = reply.usage
            prompt_tokens = usage.prompt_tokens if usage else 0
            completion_tokens = usage.completion_tokens if usage else 0
            self.tally.prompt_tokens += prompt_tokens
            self.tally.completion_tokens += completion_tokens
            if reply.choices and reply.choices[0].finish_reason == "length":  # the same request would be cut again
                budget = body.get("max_tokens")
                if retry_tokens and (budget or 0) < retry_tokens:
                    sampling["max_tokens"] = retry_tokens  # once, with the larger budget the judge file allows
                    continue
                return Judgment(None, f"truncated: the reply was cut at max_tokens={budget}; raise sampling.max_tokens "
                                      f"in {self.rubric.path}, or set sampling.retry_max_tokens to retry once with more")  # fmt: skip
            try:
                verdict = parse_verdict((reply.choices[0].message.content if reply.choices else None) or "")
                self.rubric.validate(verdict)
            except JudgeError as e:
                problem = str(e)
                continue
            if self.cache is not None:  # cache first: a kill before the jsonl write still re-asks nothing
                self.cache.put(key, verdict, prompt_tokens, completion_tokens)
            self.recent.append(None)
            return Judgment(verdict)
        kind = "" if problem.startswith("bad_reply: ") else "invalid_verdict: "
        return self._breaker(Judgment(None, f"{kind}{problem} (after {attempts} attempts)"))

    def _check_caps(self) -> None:
        """Stop before a request the spending caps do not allow (requests in flight may finish)."""
        t = self.tally
        if self.max_requests is not None and t.requests >= self.max_requests:
            raise SpendCapReached(f"judge.max_requests={self.max_requests} reached")
        if self.max_cost is not None:
            spent = self.rubric.price.cost(t.prompt_tokens, t.completion_tokens)
            if spent >= self.max_cost:
                raise SpendCapReached(f"judge.max_cost={self.max_cost:g} reached (spent {spent:.4g})")

    def _breaker(self, failed: Judgment) -> Judgment:
        """Count a failed request; when most recent ones failed, stop instead of burning through every sample."""
        self.recent.append(failed.error)
        if len(self.recent) == self.recent.maxlen and sum(e is not None for e in self.recent) >= BREAKER_FAILURES:
            raise SetupError(
                f"the judge failed {BREAKER_FAILURES} or more of its last {self.recent.maxlen} requests (the last: "
                f"{failed.error}); stopping rather than trying every sample. Verdicts already received are "
                "kept: fix the server or the judge file and run again"
            )
        return failed


async def judge_samples(
    judge: OpenAIJudge, items: list[tuple[Prompt, Sample]], num_judgments: int, on_verdict: Callable[[dict[str, Any]], None]
) -> None:
    """Judge every sample `num_judgments` times; hand each combined verdict record to `on_verdict`."""

    async def one(prompt: Prompt, sample: Sample) -> None:
        asks: list[Awaitable[Judgment]] = [
            judge.ask(prompt, r, answer=sample.answer, response=sample.text) for r in range(num_judgments)
        ]
        on_verdict(combine_judgments(judge.rubric, judge.judge_name, prompt, sample, await asyncio.gather(*asks)))

    await asyncio.gather(*(one(p, s) for p, s in items))


def combine_judgments(
    rubric: Rubric, judge_name: str, prompt: Prompt, sample: Sample, judgments: list[Judgment]
) -> dict[str, Any]:
    """One verdict record from repeated judgments: the mean of the valid ones.

    It fails (with the first reason) only when every judgment failed. With more than one
    judgment the record keeps each under `judgments`, for the self-consistency report.
    """
    ok = [rubric.normalise(j.verdict) for j in judgments if j.verdict is not None]
    if not ok:
        error = judgments[0].error or "unknown"
        if len(judgments) > 1:
            error += f" (all {len(judgments)} judgments failed)"
        record = to_dict(Verdict(sample.sample_id, prompt.prompt_id, judge_name, "failed", None, error=error))
    else:
        means = {name: sum(s[name] for s in ok) / len(ok) for name in ok[0]}
        rationale = str(next(j.verdict for j in judgments if j.verdict is not None)[RATIONALE])
        if len(judgments) > 1:
            rationale += f" [scores: mean of {len(ok)} of {len(judgments)} judgments; this rationale is the first]"
        verdict = Verdict(sample.sample_id, prompt.prompt_id, judge_name, "ok", rubric.combine(means), means, rationale)
        record = to_dict(verdict)
    if len(judgments) > 1:
        record["judgments"] = [
            {"score": rubric.combine(n := rubric.normalise(j.verdict)), "scores": n} if j.verdict else {"error": j.error}
            for j in judgments
        ]
    return record


def _schema_name(name: str) -> str:
    """response_format names allow [a-zA-Z0-9_-] only."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:64] or "verdict"
