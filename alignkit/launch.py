"""Many processes from one command: the `launch` section, and how the runner starts a stage as N processes.

With `launch.num_processes: N > 1`, a stage whose `distributed(recipe)` is True (today: `sft`, and
`train` with every method) does not run inside `alignkit run`: the runner starts it as N processes with torchrun (or with
`accelerate launch --config_file F` when `launch.config_file` is set), each running
`python -m alignkit.worker`, and waits. Every process runs the stage's `run`; accelerate splits the
work between them (each takes its slice of every global batch, gradients are averaged by DDP) and
only the main process writes metrics, checkpoints, the model and the summary. The runner records
the summary in stages.json as usual.

Batch semantics: a stage's `batch_size` is per process (per device); its global batch is
batch_size × grad_accum × num_processes. So 2 processes with batch 2 train like 1 with batch 4,
step by step, and `num_processes` is part of a distributed stage's fingerprint.
"""

from __future__ import annotations

import codecs
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from alignkit.config import Section
from alignkit.errors import LaunchError


class LaunchConfig(Section):
    """How many processes run each distributed stage (see `alignkit.launch`)."""

    num_processes: int = Field(1, ge=1)
    """Processes per distributed stage (one per GPU; on a CPU, gloo processes). batch_size is per
    process: the global batch is batch_size × grad_accum × num_processes."""
    config_file: str | None = None
    """An accelerate config file (`accelerate config`): the processes start with `accelerate launch
    --config_file F --num_processes N`; unset: with torchrun on this machine."""


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies, so that a killed launch (the
    launcher SIGKILLed, say by the OOM killer or `kill -9` on the process group) leaves no worker
    running to race the re-run for the run directory. Called in the launcher before it starts
    (`preexec_fn`) and first thing in every worker."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the call
        os._exit(1)


def command(launch: LaunchConfig, worker_args: list[str]) -> list[str]:
    """The command line that starts `python -m alignkit.worker ARGS` as `launch.num_processes` processes."""
    n = str(launch.num_processes)
    if launch.config_file:
        head = ["-m", "accelerate.commands.launch", "--config_file", launch.config_file, "--num_processes", n]
    else:
        head = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", n]
    return [sys.executable, *head, "-m", "alignkit.worker", *worker_args]


def launch_stage(launch: LaunchConfig, root: Path, name: str, round: int, fingerprint: str,
                 output: Path) -> dict[str, Any]:  # fmt: skip
    """Run stage `name` of the run in `root` (its resolved recipe.yaml) as N processes; return its summary.

    The processes' output is shown and kept in `<output>.launch.log`; a failure is a `LaunchError`
    naming the stage and that log. The main process leaves the summary in `<output>.summary.json`.
    """
    output = Path(output)
    log, summary = output.with_name(output.name + ".launch.log"), output.with_name(output.name + ".summary.json")
    summary.unlink(missing_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    args = ["--run-dir", str(root), "--stage", name, "--round", str(round), "--fingerprint", fingerprint]
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # N processes share the cores
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    with log.open("w", encoding="utf-8", newline="") as f:
        proc = subprocess.Popen(command(launch, args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)  # fmt: skip
        # chunks as they come, carriage returns kept, so that the main process's progress bar redraws its
        # line (read as text lines, every redraw would print a line of its own)
        for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
            text = decode(chunk)
            sys.stdout.write(text)
            sys.stdout.flush()
            f.write(text)
        code = proc.wait()
    if code != 0 or not summary.exists():
        tail = "".join(log.read_text(encoding="utf-8").splitlines(keepends=True)[-15:])
        raise LaunchError(
            f"stage '{name}' failed in {launch.num_processes} processes (exit code {code}); its output is in "
            f"{log}. The last lines:\n{tail}"
        )
    result = json.loads(summary.read_text())
    summary.unlink()
    return result
