"""What the judge and the `openai` sampling backend share when they call an OpenAI-compatible server.

One place for: the API key (read from the environment variable a recipe names, never from the
recipe), the async client with its retry settings, the concurrency limit and the rpm/tpm caps
(`alignkit.throttle`), images as data URLs, and how a failed request is described.
`timeout` is a deadline for the whole of each HTTP request (connect, send and every read of the
reply), not for each read: a server trickling its reply cannot hold a slot (`DeadlineTransport`).
Transport faults are retried by the openai client itself: it honours `Retry-After` on 429 (up to
60 s) and otherwise backs off exponentially (0.5 s * 2^n, at most 8 s, 25% jitter) on 408, 409,
429, 5xx, timeouts and connection errors, `max_retries` times. Those retries wait as the server
says and are not booked against the caps again.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
from typing import Any

import httpx2 as httpx  # the HTTP library the openai client is built on (a fork of httpx)
import openai
from openai.types.chat import ChatCompletion
from PIL import Image

from alignkit.throttle import Throttle


def api_key_from_env(api_key_env: str, setting: str, error: type[Exception] = ValueError) -> str:
    """The API key from the environment; the error (of type `error`) names the variable, never a value."""
    key = os.environ.get(api_key_env)
    if not key:
        raise error(
            f"{setting} needs an API key in the environment variable {api_key_env}, which is "
            "not set (for a local server that needs none, set it to any value)"
        )
    return key


def data_url(img: Image.Image, max_side: int | None = None, jpeg: bool = False) -> str:
    """An image as a base64 data URL (lossless PNG unless `jpeg`), downscaled to `max_side` if given.

    Encoding is deterministic, so the same pixels always give the same URL (and cache key)."""
    if max_side and max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if jpeg else "PNG", **({"quality": 90} if jpeg else {}))
    mime = "image/jpeg" if jpeg else "image/png"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class DeadlineTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with one deadline for a whole request, its reply's body read included.

    httpx's own timeouts bound each network operation, so a reply trickled a byte at a time never
    times out. Past the deadline this raises `httpx.ReadTimeout`, which the openai client retries
    and reports as a timeout like any other.
    """

    def __init__(self, deadline: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.deadline = deadline

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        async def whole() -> httpx.Response:
            response = await super(DeadlineTransport, self).handle_async_request(request)
            try:
                await response.aread()
            except BaseException:
                await response.aclose()
                raise
            return response

        try:
            return await asyncio.wait_for(whole(), self.deadline)
        except asyncio.TimeoutError:
            raise httpx.ReadTimeout(f"no whole reply within {self.deadline:g}s", request=request) from None


class ChatClient:
    """An async chat-completions client: at most `concurrency` requests in flight, starts capped by rpm/tpm.

    Use as `async with ChatClient(...) as c:`; hold `c.slot` around the requests that count as one
    unit of concurrency (the judge holds it across its re-asks), and send each with `c.chat`.
    """

    def __init__(
        self,
        base_url: str | None,
        api_key_env: str,
        *,
        setting: str,
        concurrency: int,
        timeout: float,
        max_retries: int,
        rpm: float | None = None,
        tpm: float | None = None,
        error: type[Exception] = ValueError,
    ):
        """`setting` names the recipe key in a missing-key error (raised here, before any output is touched)."""
        api_key_from_env(api_key_env, setting, error)
        self.base_url, self.api_key_env, self.setting, self.error = base_url, api_key_env, setting, error
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.throttle = Throttle(rpm, tpm)

    async def __aenter__(self) -> ChatClient:
        self.slot = asyncio.Semaphore(self.concurrency)  # made here: it belongs to the running event loop
        self.client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=api_key_from_env(self.api_key_env, self.setting, self.error),
            max_retries=self.max_retries,
            timeout=self.timeout,
            http_client=openai.DefaultAsyncHttpxClient(transport=DeadlineTransport(
                self.timeout, limits=httpx.Limits(max_connections=max(100, self.concurrency)))),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    def failure(self, e: openai.APIError) -> str:
        """`api_failure` for this client: the key it sends is scrubbed from the server's text."""
        return api_failure(e, self.timeout, self.max_retries, os.environ.get(self.api_key_env))

    async def chat(self, body: dict[str, Any], estimated_tokens: int) -> ChatCompletion:
        """POST one chat completion once the caps allow it; the token booking is corrected by its usage.

        The client's generic post (its documented way to send any body) keeps its retries, timeouts
        and errors but skips `create`'s per-field transform of the messages, which costs as much CPU
        as the rest of a request (a base64 image is a long string).
        """
        await self.throttle.acquire(estimated_tokens)
        try:
            reply = await self.client.post("/chat/completions", body=body, cast_to=ChatCompletion)
        except ValueError as e:  # a body that is not complete JSON (json.JSONDecodeError)
            raise BadReply(f"the reply body is not complete JSON ({e})") from None
        reply = checked(reply)
        if reply.usage:
            self.throttle.settle(estimated_tokens, reply.usage.prompt_tokens + reply.usage.completion_tokens)
        return reply


class BadReply(Exception):
    """An HTTP 200 reply that is not a usable chat completion (an HTML page, `null`, a choice
    without a message, ...). Callers re-ask within their retry budget, then record it as a failure."""


def checked(reply: Any) -> ChatCompletion:
    """`reply` if it is a usable chat completion, in the one shape the callers read: null usage
    counts become 0, content given as a list of parts becomes its text. Otherwise `BadReply`."""
    if not isinstance(reply, ChatCompletion) or not isinstance(reply.choices, list):
        raise BadReply(f"the reply is not a chat completion: {str(reply)[:80]!r}")
    if reply.usage is not None:
        reply.usage.prompt_tokens = reply.usage.prompt_tokens or 0
        reply.usage.completion_tokens = reply.usage.completion_tokens or 0
    for choice in reply.choices:
        if choice.message is None:
            raise BadReply(f"choice {choice.index} of the reply has no message")
        if isinstance(choice.message.content, list):
            parts = choice.message.content
            choice.message.content = "".join(p.get("text") or "" for p in parts if isinstance(p, dict))
    return reply


def api_failure(e: openai.APIError, timeout: float, max_retries: int, secret: str | None = None) -> str:
    """A failed request as 'kind: detail' (the kind is what summaries count), scrubbed of `secret`
    (the API key) and of anything that looks like credentials: some proxies echo the request's
    Authorization header in their error text, and this text is printed and stored."""
    after = f"after {max_retries} retries"
    if isinstance(e, openai.APITimeoutError):
        return f"timeout: no reply within {timeout:g}s, {after}"
    if isinstance(e, openai.APIConnectionError):
        return scrub(f"connection_error: {e}, {after}", secret)
    if isinstance(e, openai.APIStatusError):
        detail = f"HTTP {e.status_code} {scrub(str(e.message), secret)[:200]}"
        if e.status_code == 429:
            return f"rate_limited: {detail}, {after}"
        if e.status_code >= 500:
            return f"server_error: {detail}, {after}"
        return f"api_error: {detail}"
    return f"api_error: {scrub(str(e), secret)[:200]}"


_CREDENTIALS = re.compile(r"(?i)(bearer\s+|authorization[\"']?\s*[:=]\s*[\"']?(?:bearer\s+)?|api[_-]?key[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}]+")


def scrub(text: str, secret: str | None) -> str:
    """`text` without `secret` and without credential-looking values (bearer tokens, api_key=...)."""
    if secret:
        text = text.replace(secret, "***")
    return _CREDENTIALS.sub(lambda m: m.group(1) + "***", text)
