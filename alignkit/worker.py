"""One process of a stage started as many (`alignkit.launch`): `python -m alignkit.worker --run-dir D
--stage NAME --round R --fingerprint FP`, under torchrun or accelerate launch.

It reads the run's resolved recipe.yaml, checks that the stage's fingerprint is the one the runner
launched, and runs the stage; the main process (RANK 0) writes the summary where the runner reads it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from alignkit.console import configure as configure_console
from alignkit.errors import LaunchError
from alignkit.launch import die_with_parent
from alignkit.recipe import load_recipe
from alignkit.records import write_atomic
from alignkit.runner import Runner
from alignkit.stage import fingerprint
from alignkit.stages import STAGES


def main(argv: list[str] | None = None) -> None:
    die_with_parent()  # torchrun's agent or accelerate's launcher; killed with it
    configure_console()  # as quiet (or verbose) as the runner that launched it
    parser = argparse.ArgumentParser(prog="python -m alignkit.worker")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--stage", required=True, choices=[s.name for s in STAGES])
    parser.add_argument("--round", type=int, default=1)
    parser.add_argument("--fingerprint", required=True)
    args = parser.parse_args(argv)

    root = args.run_dir.resolve()
    recipe = load_recipe(root / "recipe.yaml", [f"output_dir={root}"])
    runner = Runner(recipe)
    stage = next(s for s in STAGES if s.name == args.stage)
    ctx = runner.context(stage, args.round)
    if (fp := fingerprint(stage, ctx)) != args.fingerprint:  # the recipe.yaml round trip lost a setting
        raise LaunchError(f"stage '{stage.name}': the worker's fingerprint {fp} is not the runner's {args.fingerprint}")
    summary = stage.run(ctx, args.fingerprint)
    if int(os.environ.get("RANK", "0")) == 0:
        output = stage.output(ctx)
        write_atomic(output.with_name(output.name + ".summary.json"), json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
