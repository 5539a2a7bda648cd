"""One process per run directory: `alignkit run` holds an OS lock on RUN_DIR/.lock while it runs.

The lock is `flock` on an open file, so the kernel releases it when its process ends, however it
ends: a lock left by a killed run is simply taken over by the next one. The file holds the owner's
pid, for the message a second process prints.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alignkit.errors import AlignkitError


class RunLockedError(AlignkitError):
    """Another alignkit process is running in the same run directory."""


@contextmanager
def run_lock(root: Path) -> Iterator[None]:
    """Hold the run directory's lock for the duration of the block, or stop at once naming its owner."""
    root.mkdir(parents=True, exist_ok=True)
    f = (root / ".lock").open("a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "unknown"
        f.close()
        raise RunLockedError(
            f"{root} is in use by another alignkit process (pid {owner}); two runs in one directory would "
            "pay twice and overwrite each other's files: wait for it, stop it, or set another output_dir"
        ) from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
