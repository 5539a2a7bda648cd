"""Counting a judge run's outcomes (shown live on a tqdm bar) and its requests and tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm import tqdm

from alignkit.records import Verdict


@dataclass
class Tally:
    """What happened to the samples judged in this run (resumed ones are counted by the caller)."""

    ok: int = 0
    failed: int = 0
    cached: int = 0
    requests: int = 0  # chat requests this run sent (the openai client's own retries not counted)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _bar: tqdm | None = field(default=None, repr=False)

    def open_bar(self, total: int, desc: str) -> None:
        self._bar = tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def add(self, verdict: Verdict, cached: bool = False) -> None:
        if verdict.status == "ok":
            self.ok += 1
        else:
            self.failed += 1
        self.cached += cached
        if self._bar is not None:
            stats = {"done": self.ok, "failed": self.failed, "cached": self.cached}
            self._bar.set_postfix(ordered_dict=stats, refresh=False)
            self._bar.update(1)
