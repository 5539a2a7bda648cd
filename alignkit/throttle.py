"""Request and token caps per minute for OpenAI-compatible requests (judge, sampler): even spacing.

Each cap is a leaky bucket without burst: with `rpm` set, request starts are at least 60/rpm
seconds apart; with `tpm` set, a request estimated at t tokens holds the next start back by
60*t/tpm seconds, corrected by the reply's real usage. Even spacing never bursts past a
provider's per-minute (or per-second) window, which is what gets a client 429s.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

# OpenAI's high-detail price of a 512x512 image (85 base + 4 tiles x 170): a fair estimate for a
# downscaled judge image; the reply's usage corrects the estimate anyway.
IMAGE_TOKENS = 765
CHARS_PER_TOKEN = 4


def estimate_tokens(messages: list[dict[str, Any]], max_tokens: int) -> int:
    """Tokens a request may use before it is sent: text chars / 4, 765 per image, plus `max_tokens`."""
    chars = images = 0
    for m in messages:
        content = m["content"]
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if part["type"] == "text":
                chars += len(part["text"])
            else:
                images += 1
    return chars // CHARS_PER_TOKEN + IMAGE_TOKENS * images + max_tokens


class Throttle:
    """Holds each request back until both caps allow it; no cap set means no waiting."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.rpm, self.tpm, self.clock = rpm, tpm, clock
        self._next_request = 0.0  # earliest start the rpm cap allows
        self._next_token = 0.0  # earliest start the tpm cap allows
        self.waited = 0.0  # seconds requests spent held back, in all

    def reserve(self, tokens: int) -> float:
        """Book the next start for a request of `tokens` (estimated); return how long to wait for it."""
        now = self.clock()
        start = max(now, self._next_request, self._next_token)
        if self.rpm:
            self._next_request = start + 60.0 / self.rpm
        if self.tpm:
            self._next_token = start + 60.0 * tokens / self.tpm
        self.waited += start - now
        return start - now

    async def acquire(self, tokens: int) -> None:
        """Wait for this request's turn (reservation needs no lock: nothing awaits inside it)."""
        delay = self.reserve(tokens)
        if delay > 0:
            await asyncio.sleep(delay)

    def settle(self, estimated: int, used: int) -> None:
        """Correct the token booking with what the reply says it used."""
        if self.tpm:
            self._next_token += 60.0 * (used - estimated) / self.tpm
