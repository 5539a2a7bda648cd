"""Counting a judge run's judgments (shown live on a tqdm bar) and its requests and tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tqdm import tqdm

from alignkit.console import progress


@dataclass
class Tally:
    """What happened to the judgments asked in this run (resumed verdicts are counted by the caller).

    A judgment is one verdict asked of the judge: one per sample, `num_judgments` per sample
    with self-consistency, or one per order of each pair for a pairwise judge.
    """

    ok: int = 0
    failed: int = 0
    cached: int = 0
    requests: int = 0  # chat requests this run sent (the openai client's own retries not counted)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    _bar: tqdm | None = field(default=None, repr=False)

    def open_bar(self, total: int, desc: str) -> None:
        self.started = time.monotonic()
        self._bar = progress(total=total, desc=desc, unit="judgment")

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def request_rate(self) -> float:
        """Requests per second since the bar opened."""
        return self.requests / max(time.monotonic() - self.started, 1e-9)

    def add(self, ok: bool, cached: bool = False) -> None:
        if ok:
            self.ok += 1
        else:
            self.failed += 1
        self.cached += cached
        if self._bar is not None:
            stats = {"done": self.ok, "failed": self.failed, "cached": self.cached, "req/s": f"{self.request_rate():.1f}"}
            self._bar.set_postfix(ordered_dict=stats, refresh=False)
            self._bar.update(1)
