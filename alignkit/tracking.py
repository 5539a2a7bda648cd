"""Experiment tracking: the `tracking` section, and the one place training metrics are written.

Every trainer (sft, DPO and MM-DPO through TRL, PPO, the reward model) writes each logged step with
`StepLog.write`: one flushed line of `metrics.jsonl` (a kill loses at most that line) and, with
`tracking.report_to` set, the same numbers to accelerate's tracker of that name (TensorBoard,
Weights & Biases, Trackio) on the main process. The eval stage logs its results at the end, one
step per round. Trackers write under `RUN_DIR/tracking/`, offline by default: nothing leaves the
machine unless `tracking.offline: false` lets wandb sync.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from alignkit.config import Section
from alignkit.errors import SetupError


class TrackingConfig(Section):
    """Where training curves and eval results go besides metrics.jsonl and results.json."""

    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = "none"
    """`tensorboard` (`uv sync --extra tracking`), `wandb` or `trackio` (install the package); each
    stage is one tracker run named `<run_name>/<stage>`."""
    project: str = "alignkit"
    """The wandb / trackio project."""
    run_name: str | None = None
    """Default: the run directory's name."""
    offline: bool = True
    """wandb: log offline into RUN_DIR/tracking (`wandb sync` uploads later); false lets it sync live."""


# The section's keys: a stage that logs declares the section and excludes them all (where its
# curves go does not change what it computes).
TRACKING_KEYS = ("tracking.report_to", "tracking.project", "tracking.run_name", "tracking.offline")


@dataclass(frozen=True)
class Tracking:
    """One stage's tracker run: the section, the directory the trackers write in, and the run's name."""

    config: TrackingConfig
    directory: Path
    name: str

    @classmethod
    def for_stage(cls, config: TrackingConfig, run_dir: Path, stage: str) -> Tracking:
        return cls(config, Path(run_dir) / "tracking", f"{config.run_name or Path(run_dir).resolve().name}/{stage}")

    def open(self) -> list[Any]:
        """accelerate's tracker for `report_to` (none: no tracker); a missing package is a clear error."""
        kind = self.config.report_to
        if kind == "none":
            return []
        from accelerate import tracking

        self.directory.mkdir(parents=True, exist_ok=True)
        if kind == "tensorboard":
            tracker = tracking.TensorBoardTracker(self.name, self.directory)
        elif kind == "wandb":
            if self.config.offline:
                os.environ.setdefault("WANDB_MODE", "offline")
            tracker = tracking.WandBTracker(self.config.project, name=self.name, dir=str(self.directory))
        else:
            tracker = tracking.TrackioTracker(self.config.project, name=self.name)
        try:
            tracker.start()
            return [tracker]
        except ImportError as e:
            extra = "uv sync --extra tracking" if kind == "tensorboard" else f"pip install {kind}"
            raise SetupError(f"tracking.report_to: {kind} needs its package ({extra}): {e}") from None


def log_results(tracking: Tracking, results: dict[str, Any], step: int) -> None:
    """Evaluation results (their numbers) as one step of the stage's tracker run."""
    trackers = tracking.open()
    for tracker in trackers:
        tracker.log(numbers(results), step=step)
        tracker.finish()


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a record (what a tracker can plot), nested keys joined with '/'."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out |= {f"{key}/{k}": v for k, v in numbers(value).items()}
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


class StepLog:
    """metrics.jsonl and the trackers of one training run; use it on the main process only."""

    def __init__(self, path: Path, tracking: Tracking | None = None):
        self.path = Path(path)
        self.trackers = tracking.open() if tracking is not None else []

    def write(self, record: dict[str, Any]) -> None:
        """One logged step (its `step` key is the tracker's step)."""
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        values = {k: v for k, v in numbers(record).items() if k != "step"}
        for tracker in self.trackers:
            tracker.log(values, step=int(record["step"]))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
