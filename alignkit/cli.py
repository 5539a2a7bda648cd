"""The `alignkit` command: run a whole recipe, or one stage of it, plus small data/model tools."""

from __future__ import annotations

import inspect
import multiprocessing
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from alignkit.console import VERBOSE_ENV
from alignkit.console import configure as configure_console
from alignkit.errors import AlignkitError, ModelError, RecipeError, RecordError
from alignkit.stages import STAGES

if multiprocessing.current_process().name != "MainProcess":  # a process vLLM spawned, which imports this
    configure_console()  # module first: as quiet (or verbose) as its parent, before it imports vLLM

console = Console()
err_console = Console(stderr=True)
DEBUG_ENV = "ALIGNKIT_DEBUG"
_debug = False


class _Commands(TyperGroup):
    """The command group: an `AlignkitError` from any command is one line `error: ...` and exit 2.

    With `--debug` (or ALIGNKIT_DEBUG=1) it is raised instead, so its traceback shows; any other
    exception is a bug in alignkit and always keeps its traceback.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AlignkitError as e:
            if _debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            err_console.print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Commands,
    help=(
        "alignkit: RLAIF preference alignment for vision-language models.\n\n"
        "A recipe (YAML) describes the loop: prompts -> sample K chain-of-thought answers -> judge them "
        "-> build preference pairs -> DPO with LoRA. `alignkit run RECIPE` runs every stage into the "
        "recipe's output_dir; each stage command runs just that stage. Finished stages are skipped "
        "and killed stages resume. Any recipe key can be overridden as section.key=value."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help=f"Show the traceback of an error (also: {DEBUG_ENV}=1).")
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v",
                     help=f"Show the libraries' logs (vLLM, transformers, TRL, ...) at INFO (also: {VERBOSE_ENV}=1)."),
    ] = False,
) -> None:
    global _debug
    _debug = debug
    configure_console(verbose or None)  # without -v, ALIGNKIT_VERBOSE decides

RecipeArg = Annotated[
    str, typer.Argument(help="Recipe YAML path, or the name of a built-in recipe (see `alignkit recipes`).")
]
OverridesArg = Annotated[
    Optional[list[str]],
    typer.Argument(help="Overrides as section.key=value, e.g. sample.num_samples=8 judge.backend=openai."),
]


def _recipe_path(recipe: str) -> Path:
    """A recipe file, or a built-in recipe by name; anything else is an error listing the built-ins."""
    from alignkit.resources import builtin_dir

    path = Path(recipe)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    builtin = builtin_dir("recipes") / f"{recipe}.yaml"
    if not builtin.is_file():
        names = ", ".join(sorted(p.stem for p in builtin.parent.glob("*.yaml")))
        raise RecipeError(
            f"{recipe}: no such recipe file, nor a built-in recipe (built-ins: {names}; see `alignkit recipes`)"
        )
    return builtin


def _run(recipe: str, overrides: list[str] | None, stages: list[str] | None) -> None:
    from alignkit.recipe import load_recipe
    from alignkit.runner import Runner

    cfg = load_recipe(_recipe_path(recipe), overrides or [])
    runner = Runner(cfg, console)
    runner.run(stages)
    _print_outputs(runner)


def _print_outputs(runner) -> None:
    """The run's outputs, one per line within the console's width, each path whole (so it can be
    copied): relative to the current directory where that is shorter, on a line of its own when long."""
    paths = runner.paths
    model, adapter = runner.trained(paths.round) or (None, None)
    rows = [(label, shown_path(p)) for label, p in [
        ("run directory", paths.root),
        ("resolved recipe", paths.recipe),
        ("samples", paths.samples),
        ("verdicts", paths.verdicts),
        ("pairs (TRL format)", paths.pairs),
        ("reward model", paths.reward_model / "model"),
        ("reward-model scores", paths.rm_scores),
        ("adapter (PEFT)", Path(adapter) if adapter else None),
        ("model (full fine-tuning)", Path(model) if model and not adapter else None),
        ("evaluation", paths.eval),
        ("report", paths.root / "report.html"),
    ] if p is not None and p.exists()]  # fmt: skip
    width = max(len(label) for label, _ in rows)
    console.rule("[bold]outputs")
    for label, path in rows:
        if 2 + width + 2 + len(path) <= console.width:
            console.print(Text(f"  {label:<{width}}  {path}"), soft_wrap=True)
        else:
            console.print(Text(f"  {label}"), soft_wrap=True)
            console.print(Text(f"    {path}"), soft_wrap=True)  # never wrapped nor cut, even past the width
    _print_before_after(paths)


def _print_before_after(paths) -> None:
    """After a run that evaluated its trained policy: the paired-tested rates before and after with
    their 95% intervals (`alignkit.evaluate.headline`), and where the report is."""
    import json

    from alignkit.evaluate import headline

    base, after = paths.eval / "base" / "results.json", paths.eval / f"round-{paths.round}" / "results.json"
    report = paths.root / "report.html"
    if not (base.exists() and after.exists()):
        return
    table = headline(json.loads(base.read_text()), json.loads(after.read_text()))
    if not table:
        return
    console.rule("[bold]before -> after (p: paired test)")
    console.print(Text(table), soft_wrap=True)
    console.print(Text(f"every metric and its change: {shown_path(paths.eval / 'comparison.txt')}"), soft_wrap=True)
    if report.exists():
        console.print(Text(f"the run report (open it in a browser): {shown_path(report)}"), soft_wrap=True)


def shown_path(path: Path) -> str:
    """`path` relative to the current directory where that is shorter, else absolute."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # on another drive (Windows)
        return str(path)
    return relative if len(relative) < len(str(path)) else str(path)


@app.command()
def run(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    stages: Annotated[
        Optional[str], typer.Option(help="Comma-separated stages to run (default: the recipe's `stages`).")
    ] = None,
) -> None:
    """Run a recipe's stages in order (prompts, sample, judge, pairs, train) into its output_dir."""
    _run(recipe, overrides, stages.split(",") if stages else None)


def _stage_command(stage) -> None:
    def run_one(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
        _run(recipe, overrides, [stage.name])

    def run_or_plan(
        recipe: RecipeArg,
        overrides: OverridesArg = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what it would send and cost; send nothing.")] = False,
    ) -> None:
        if not dry_run:
            return _run(recipe, overrides, [stage.name])
        from alignkit.recipe import load_recipe
        from alignkit.runner import Runner

        plan = Runner(load_recipe(_recipe_path(recipe), overrides or []), console).dry_run(stage)
        table = Table(title=f"{stage.command} --dry-run: nothing was sent", show_header=False)
        for key, value in plan.items():
            table.add_row(key, "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value))
        console.print(table)

    command = run_or_plan if hasattr(stage, "dry_run") else run_one
    command.__doc__ = inspect.getdoc(stage) or stage.name
    app.command(name=stage.command)(command)


for _stage in STAGES:
    _stage_command(_stage)


@app.command()
def ppo(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """PPO on the recipe's prompts (the train stage with train.method=ppo and the `ppo` section): K answers
    per prompt from the current policy, rewards from the judge, the reference judge, the critique reward
    model or a Python function, a per-token KL penalty to the reference, GAE, clipped policy and value
    losses. Writes train/adapter, train/metrics.jsonl and train/checkpoints."""
    _run(recipe, [*(overrides or []), "train.method=ppo"], ["train"])


@app.command("judge-eval")
def judge_eval(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    labels: Annotated[
        Optional[Path], typer.Option(help="Labelled preference file (jsonl, json, parquet); default judge.calibration.")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option(help="Where to write the figures (default RUN_DIR/judge_eval.json).")
    ] = None,
) -> None:
    """Measure the recipe's judge on labelled preference data before paying for a run: accuracy with a 95%
    interval, tie rate, position consistency (pairwise judges), agreement with the reference judge (records
    with gold `objects`), requests and cost per 1,000 verdicts. Records hold image(s), question and
    answer_a / answer_b / label (a, b or tie), or chosen / rejected (label implied, or a `label` column:
    alignkit's pairs.jsonl works); see alignkit/judge/calibration.py. Verdicts are cached with the judge
    stage's (RUN_DIR/judge_cache.sqlite): a re-run pays for nothing it already asked."""
    from alignkit.judge.calibration import figures_table
    from alignkit.judge.calibration import judge_eval as measure
    from alignkit.lock import run_lock
    from alignkit.recipe import load_recipe
    from alignkit.stage import RunPaths

    cfg = load_recipe(_recipe_path(recipe), overrides or [])
    source = labels or (Path(cfg.judge.calibration) if cfg.judge.calibration else None)
    if source is None:
        raise RecipeError("judge-eval needs a labelled file: --labels FILE, or judge.calibration in the recipe")
    root = Path(cfg.output_dir).resolve()
    with run_lock(root):
        result = measure(source, cfg.judge, out or root / "judge_eval.json", RunPaths(root).judge_cache,
                         template=cfg.sample.template, allow_outside_paths=cfg.data.allow_outside_paths)  # fmt: skip
    console.print(figures_table(result))
    console.print(Text(f"wrote {shown_path(Path(result['output']))}"), soft_wrap=True)


@app.command()
def compare(
    before: Annotated[Path, typer.Argument(help="the first results.json, or its folder (RUN/eval/base).")],
    after: Annotated[Path, typer.Argument(help="the second results.json, or its folder.")],
) -> None:
    """Print two evaluations side by side with the change in every metric and, on the same questions,
    paired tests: McNemar's exact test for per-question rates, a paired bootstrap for CHAIR_i and F1;
    "n.s." marks a change not significant at 0.05."""
    from alignkit.evaluate import compare as compare_results

    first, second = _read_results(before), _read_results(after)
    try:
        console.print(compare_results(first, second))
    except RecordError as e:
        raise RecordError(f"{before} vs {after}: {e}") from None


def _read_results(path: Path) -> dict:
    import json

    path = path / "results.json" if path.is_dir() else path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        what = "file not found" if isinstance(e, FileNotFoundError) else f"cannot read it ({e})"
        raise RecordError(f"{path}: {what}; expected an evaluation's results.json (e.g. RUN/eval/base/results.json)") from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); expected an evaluation's results.json") from None
    if not isinstance(results, dict):
        raise RecordError(f"{path}: expected a JSON object (an evaluation's results.json), got {type(results).__name__}")
    return results


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (a recipe's output_dir).")],
    out: Annotated[Optional[Path], typer.Option(help="Where to write it (default RUN_DIR/report.html).")] = None,
) -> None:
    """Write the run's report: one self-contained HTML file (no network needed to view it) with the judge's
    score distributions, failure reasons and consistency, margins and length bias, training curves,
    before/after evaluation, cost and run time per stage, and a viewer of every pair."""
    from alignkit.report import write_report

    console.print(f"wrote {write_report(run_dir, out)}")


@app.command()
def recipes() -> None:
    """List the built-in recipes (usable by name: `alignkit run quickstart`)."""
    from alignkit.resources import builtin_dir

    for p in sorted(builtin_dir("recipes").glob("*.yaml")):
        first = p.read_text().splitlines()[0] if p.read_text() else ""
        console.print(f"[bold]{p.stem}[/]  {p}  {first}")


@app.command()
def judges() -> None:
    """List the built-in judges (name them in a recipe as judge.rubric=NAME)."""
    from alignkit.judge.rubric import load_rubric
    from alignkit.resources import builtin_dir

    for p in sorted(builtin_dir("judges").glob("*.yaml")):
        console.print(f"[bold]{p.stem}[/]  {load_rubric(str(p)).description}")


@app.command("make-shapes")
def make_shapes(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write prompts.jsonl and images/ into.")],
    num_prompts: Annotated[int, typer.Option(help="How many prompts.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same world.")] = 0,
) -> None:
    """Write a synthetic shapes-world prompt set (images + questions with gold annotations)."""
    from alignkit.records import write_jsonl
    from alignkit.worlds.shapes import make_shapes_prompts

    prompts = make_shapes_prompts(out_dir, num_prompts, seed=seed)
    console.print(f"wrote {len(prompts)} prompts to {write_jsonl(out_dir / 'prompts.jsonl', prompts)}")


@app.command("make-tiny-model")
def make_tiny_model(
    name: Annotated[str, typer.Argument(help="tiny:qwen2-vl, tiny:llava, tiny:gemma3, ... (see README, Model families)")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to save the model, processor and tokenizer in.")],
    seed: Annotated[int, typer.Option(help="Seed for the random weights.")] = 0,
) -> None:
    """Build a tiny random-weight VLM offline (for tests and trying alignkit without downloads)."""
    from alignkit.models import BUILDERS

    if name not in BUILDERS:
        raise ModelError(f"unknown tiny model {name!r}; choose one of {sorted(BUILDERS)}")
    console.print(f"saved {BUILDERS[name](out_dir, seed=seed)}")


export_app = typer.Typer(cls=_Commands, no_args_is_help=True, help="Write alignkit's outputs in other tools' formats.")
app.add_typer(export_app, name="export")


@export_app.command("pairs")
def export_pairs(
    source: Annotated[Path, typer.Argument(help="A run directory (or its round-<r>/) or a pairs jsonl.")],
    to: Annotated[str, typer.Option("--to", help="llamafactory or swift.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the dataset and its images/ into.")],
    name: Annotated[str, typer.Option(help="Dataset name (file name and dataset_info.json key).")] = "alignkit_pairs",
) -> None:
    """Write the pairs as a LLaMA-Factory (sharegpt preference, with its dataset_info.json entry) or an
    ms-swift (RLHF: messages + rejected_response) dataset, images copied into OUT/images/."""
    from alignkit.export import export_pairs as export

    done = export(source, to, out, name)
    console.print(f"wrote {done['pairs']} pairs to {done['file']} ({done['images']} images in {out / 'images'})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
