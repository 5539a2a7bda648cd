"""A sqlite cache of parsed verdicts, so a re-run (or a run killed and restarted) re-asks nothing.

Keys hash everything that decides the reply: the judge file's prompts and schema (its
`request_hash`), the model, the sampling parameters and the exact messages, image bytes
included, plus the repetition number for repeated judgments (`num_judgments > 1`), so each
repetition is its own paid-for verdict. Only valid verdicts are stored, so a failed one is asked
again by the next fresh run. The database is in WAL mode with `synchronous=NORMAL`: a commit
survives a killed process (what resuming needs) without an fsync per verdict.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any


def cache_key(
    judge_hash: str, model: str, sampling: dict[str, Any], messages: list[dict[str, Any]], repetition: int = 0
) -> str:
    """sha256 over a canonical JSON of the request's deciding parts (repetition 0 adds nothing)."""
    parts = {"judge": judge_hash, "model": model, "sampling": sampling, "messages": messages}
    if repetition:
        parts["repetition"] = repetition
    blob = json.dumps(
        parts,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class VerdictCache:
    """key -> (verdict dict, prompt tokens, completion tokens), committed on every put."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, verdict TEXT NOT NULL,"
            " prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL)"
        )
        self._db.commit()

    def get(self, key: str) -> tuple[dict[str, Any], int, int] | None:
        row = self._db.execute(
            "SELECT verdict, prompt_tokens, completion_tokens FROM verdicts WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else (json.loads(row[0]), row[1], row[2])

    def put(self, key: str, verdict: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?)",
            (key, json.dumps(verdict, ensure_ascii=False), prompt_tokens, completion_tokens),
        )
        self._db.commit()

    def close(self) -> None:
        self._db.close()
