"""Runs a recipe's stages in order in one run directory, skipping work that is already done.

The runner knows no stage in particular (they are in `alignkit.stages`). It keeps three things:
- skip/resume: a stage whose output exists under the same fingerprint (see `alignkit.stage`) is
  skipped; a stage whose fingerprint changed has its output directory cleared and runs again; a
  stage killed midway resumes inside its own code (jsonl records, the judge's cache, checkpoints);
- the round loop: round r > 1 runs the per-round stages again under `round-<r>/`;
- the policy lineage: which model each round starts from, and what identifies it.

`stages.json` holds each finished stage's fingerprint and summary, keyed `name` (round 1) or
`name@round-r`. The run directory's layout is `alignkit.stage.RunPaths`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from alignkit.errors import RecipeError, StageInputError
from alignkit.launch import launch_stage
from alignkit.lock import run_lock
from alignkit.recipe import Recipe, resolved_yaml
from alignkit.records import write_atomic
from alignkit.stage import Context, RunPaths, Stage, digest, fingerprint, identity, model_identity, require, stage_key
from alignkit.stages import STAGE_NAMES, STAGES


class Runner:
    """Runs the stages of one recipe; keeps per-stage state in `stages.json`."""

    def __init__(self, recipe: Recipe, console: Console | None = None):
        self.recipe = recipe
        self.root = Path(recipe.output_dir).resolve()  # records carry absolute image paths
        self.console = console or Console()
        self.root.mkdir(parents=True, exist_ok=True)
        state = RunPaths(self.root).state
        self.state: dict[str, Any] = json.loads(state.read_text()) if state.exists() else {}
        self.paths = RunPaths(self.root)  # the last round run

    # -- skip / resume --------------------------------------------------------------------------

    def step(self, key: str, settings: dict[str, Any], reads: list[Path], output: Path,
             work: Callable[[str], dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
        """Run `work(fingerprint)` unless `output` exists under the same fingerprint; record the result."""
        require(reads, key)
        fp = digest(settings, reads, self.root)
        last = self.state.get(key, {})
        if output.exists() and last.get("fingerprint") == fp and last.get("status") == "done":
            self.console.print(f"[green]✓[/] {key}: up to date, skipped ({output})")
            return last["summary"]
        if last.get("fingerprint") not in (None, fp) and output.is_dir():
            shutil.rmtree(output)  # checkpoints or results of other inputs or settings are stale
        self._record(key, {"fingerprint": fp, "status": "running"})
        self.console.rule(f"[bold]{key}")
        start = time.monotonic()
        summary = work(fp)
        summary["seconds"] = round(time.monotonic() - start, 2)
        self._record(key, {"fingerprint": fp, "status": "done", "summary": summary})
        # soft wrap: the terminal folds the line; rich would cut the paths in it at the width
        self.console.print(f"[green]✓[/] {key}: {json.dumps(summary, default=str)}", soft_wrap=True)
        return summary

    def _record(self, key: str, entry: dict[str, Any]) -> None:
        self.state[key] = entry
        if os.environ.get("RANK", "0") == "0":  # in a launch (alignkit.worker) only the main process writes
            write_atomic(RunPaths(self.root).state, json.dumps(self.state, indent=2))

    def context(self, stage: Stage | None, round: int = 1) -> Context:
        return Context(self.recipe, RunPaths(self.root, round), stage, self, self.console, self.step)

    def fingerprint_of(self, stage: Stage, round: int = 1) -> str:
        """The fingerprint `stage` would run under now (its inputs must exist)."""
        ctx = self.context(stage, round)
        require(stage.reads(ctx), stage.name)
        return fingerprint(stage, ctx)

    def run_stage(self, stage: Stage, round: int = 1) -> dict[str, Any]:
        """Run one stage in one round (skipped when up to date)."""
        ctx, launch = self.context(stage, round), self.recipe.launch
        reads = stage.reads(ctx)
        require(reads, stage.name)

        def work(fp: str) -> dict[str, Any]:
            if launch.num_processes > 1 and hasattr(stage, "distributed"):
                if stage.distributed(self.recipe):  # N processes: alignkit.launch
                    summary = launch_stage(launch, self.root, stage.name, round, fp, stage.output(ctx))
                    # the main process recorded the stage's own steps (`ctx.step`) in stages.json
                    self.state = json.loads(RunPaths(self.root).state.read_text())
                    return summary
                self.console.print(f"[yellow]![/] {stage_key(stage.name, round)}: runs in one process "
                                   f"(launch.num_processes={launch.num_processes} does not apply to it with this recipe)")  # fmt: skip
            return stage.run(ctx, fp)

        return self.step(stage_key(stage.name, round), identity(stage, ctx), reads, stage.output(ctx), work)

    def dry_run(self, stage: Stage, round: int = 1) -> dict[str, Any]:
        """What `stage` would do now (its `dry_run`), doing nothing."""
        ctx = self.context(stage, round)
        require(stage.reads(ctx), stage.name)
        return stage.dry_run(ctx)

    # -- the round loop -------------------------------------------------------------------------

    def run(self, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Run `names` (default: the recipe's stages) in pipeline order; return each stage's summary.
        One process per run directory: a second `run` on it stops at once (`alignkit.lock`)."""
        wanted = names or list(self.recipe.stages)
        unknown = [s for s in wanted if s not in STAGE_NAMES]
        if unknown:
            raise RecipeError(f"unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGE_NAMES)}")
        self._require_sft_model(wanted)
        with run_lock(self.root):
            write_atomic(RunPaths(self.root).recipe, resolved_yaml(self.recipe))
            self.calibrate()
            stages = [s for s in STAGES if s.name in wanted]
            results = {s.name: self.run_stage(s) for s in stages if not s.per_round}
            per_round = [s for s in stages if s.per_round]
            for r in range(1, self.recipe.rounds + 1):
                self.paths = RunPaths(self.root, r)
                if r > 1 and per_round:
                    self._merge(r - 1)
                for s in per_round:
                    results[stage_key(s.name, r)] = self.run_stage(s, r)
            self._write_report()
        return results

    def _require_sft_model(self, wanted: list[str]) -> None:
        """A recipe with an `sft` section starts from RUN/sft/model: stop before anything runs when a
        stage that loads the policy is asked for, the sft stage is not, and that model is missing."""
        model = RunPaths(self.root).sft / "model"
        own_model = ["score"] + (["reward_model"] if self.recipe.reward_model.model else [])
        loads_policy = [s for s in wanted if s not in ("sft", "prompts", "judge", "pairs", *own_model)]
        if self.recipe.sft is not None and "sft" not in wanted and loads_policy and not model.exists():
            raise RecipeError(
                f"stage '{loads_policy[0]}' starts from the SFT model {model}, which does not exist yet: the "
                f"recipe has an sft section. Add sft to the stages (or run `alignkit sft RECIPE` first), or set "
                f"sft=null to start from policy.model ({self.recipe.policy.model})"
            )

    def calibrate(self) -> dict[str, Any] | None:
        """The judge's calibration gate (`judge.min_accuracy`): measure the judge on `judge.calibration`
        before any stage runs, and stop if its accuracy falls below. Recorded like a stage (`calibration`
        in stages.json, RUN_DIR/calibration.json): a re-run with the same judge and labels asks nothing."""
        from alignkit.judge.calibration import figures_table, judge_eval
        from alignkit.judge.rubric import JudgeError
        from alignkit.judge.stage import UNCHANGING, judge_files

        judge = self.recipe.judge
        if judge.min_accuracy is None:
            return None
        labels, out = Path(judge.calibration), self.root / "calibration.json"
        if not labels.is_file():
            raise JudgeError(f"judge.calibration: {labels}: labelled file not found (judge.min_accuracy needs it)")
        data = self.recipe.data
        settings = {"judge": judge.model_dump(mode="json", exclude={k.split(".", 1)[1] for k in UNCHANGING}),
                    "template": self.recipe.sample.template, "allow_outside_paths": data.allow_outside_paths}  # fmt: skip
        summary = self.step("calibration", settings, [labels, *judge_files(judge)], out, lambda fp: judge_eval(
            labels, judge, out, RunPaths(self.root).judge_cache, template=self.recipe.sample.template,
            allow_outside_paths=data.allow_outside_paths))  # fmt: skip
        self.console.print(figures_table(summary))
        accuracy = summary["accuracy"]
        if accuracy is None or accuracy < judge.min_accuracy:
            lo, hi = summary["accuracy_ci"]
            shown = "unknown (no verdict)" if accuracy is None else f"{accuracy:.3f} (95% CI [{lo:.3f}, {hi:.3f}])"
            raise JudgeError(
                f"the judge's accuracy on {labels} is {shown} over {summary['verdicts']} labelled records, below "
                f"judge.min_accuracy={judge.min_accuracy:g}: stopping before any stage runs (nothing sampled or "
                f"trained). Figures in {out}; change the judge (judge.rubric, judge.model) or judge.min_accuracy"
            )
        return summary

    def _write_report(self) -> None:
        """Refresh RUN_DIR/report.html (`alignkit.report`). The stages' work is done and recorded by now,
        so a report that cannot be written is a warning, never a failed run."""
        from rich.markup import escape

        from alignkit.report import write_report

        try:
            self.console.print(f"[green]✓[/] report: {escape(str(write_report(self.root)))}")
        except Exception as e:  # any failure here must leave the finished run alone
            self.console.print(f"[yellow]![/] the run report could not be written ({type(e).__name__}: "
                               f"{escape(str(e))}); try `alignkit report {escape(str(self.root))}`")  # fmt: skip

    def _merge(self, round: int) -> None:
        """Merge round `round`'s adapter into its base: the next round's starting policy."""
        from alignkit.models import merge_adapter

        trained = self.trained(round)
        if trained is None:
            raise StageInputError(
                f"round {round + 1} starts from round {round}'s trained policy, which does not exist yet; "
                "run the earlier round first (alignkit run RECIPE)"
            )
        out = RunPaths(self.root, round).train / "merged"
        settings = {"trained": trained, "train": self.fingerprint(stage_key("train", round))}
        self.step(f"merge@round-{round}", settings, [], out, lambda fp: {"merged": str(merge_adapter(*trained, out))})

    # -- the policy lineage ---------------------------------------------------------------------

    def fingerprint(self, key: str) -> str | None:
        """The fingerprint a stage last ran under (None if it never did)."""
        return self.state.get(key, {}).get("fingerprint")

    def policy(self, round: int) -> str:
        """The model a round samples from and trains on: the SFT model (recipes with `sft`) or
        policy.model in round 1, then the previous round's trained policy, merged (so DPO's
        reference is the previous policy)."""
        if round > 1:
            return str(RunPaths(self.root, round - 1).train / "merged")
        return str(RunPaths(self.root).sft / "model") if self.recipe.sft is not None else self.recipe.policy.model

    def policy_identity(self, round: int) -> dict[str, Any]:
        """What identifies a round's starting policy in fingerprints: the SFT run or the model, then
        the previous round's training."""
        if round > 1:
            return {"previous_train": self.fingerprint(stage_key("train", round - 1))}
        if self.recipe.sft is not None:
            return {"sft": self.fingerprint("sft")}
        return {"model": model_identity(self.recipe.policy.model)}

    def trained(self, round: int) -> tuple[str, str | None] | None:
        """(model, adapter) of the policy round `round`'s train stage wrote, or None before it has:
        the round's starting model with train/adapter (LoRA, QLoRA), or train/model alone (full)."""
        paths, train = RunPaths(self.root, round), self.recipe.train
        if train.method in ("mmdpo", "ppo", "grpo", "rloo") and train.finetune == "full":
            return (str(paths.model), None) if paths.model.exists() else None
        return (self.policy(round), str(paths.adapter)) if paths.adapter.exists() else None
