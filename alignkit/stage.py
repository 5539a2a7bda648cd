"""The Stage protocol, what a stage sees of its run, and the fingerprint rule.

A stage is one module next to the code it drives (`alignkit/sample/stage.py`, ...), registered once
in `alignkit.stages`. It declares:

- `name`, and `per_round` (runs once per round, under `round-<r>/` after the first);
- `config(recipe)`: the recipe keys it reads, as dotted paths (`"sample"`, `"sample.template"`, `"seed"`).
  While it runs it sees the recipe only through `ctx.config`, which refuses every other key, so
  a stage cannot depend on a setting its fingerprint leaves out;
- `exclude`: the dotted keys among those that cannot change its output (a client's concurrency);
- `reads(ctx)`: the files whose bytes its result depends on (inputs, judge files, templates, ...);
- `upstream(ctx)`: identities of inputs that are not plain files (the policy it starts from);
- `output(ctx)`: the file or directory whose existence means "done";
- `run(ctx, fingerprint)`: does the work and returns a JSON-able summary;
- optionally `dry_run(ctx)`: what `run` would do and cost, doing nothing (its command gets
  `--dry-run`);
- optionally `distributed(recipe) -> bool`: True when its `run`, with this recipe, works as one of N
  processes under accelerate, so with `launch.num_processes > 1` the runner starts it as N processes
  (`alignkit.launch`); False: it runs in one process and the runner says so. Every process calls
  `run`; only the main one writes (accelerate's `is_main_process`), and its summary is the one
  recorded. Its config declares `launch` when it runs distributed (a per-device batch size makes
  the global batch depend on `launch.num_processes`).

The fingerprint is derived, never assembled by hand: the stage's name, the dump of its config keys
minus `exclude`, the digest of every file it reads and its upstream identities.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

from pydantic import BaseModel

from alignkit.config import Section
from alignkit.records import file_digest

if TYPE_CHECKING:
    from rich.console import Console

    from alignkit.tracking import Tracking



@dataclass(frozen=True)
class RunPaths:
    """Where each stage writes inside a run directory (round 1 at the top, round r in round-<r>/)."""

    root: Path
    round: int = 1

    @property
    def work(self) -> Path:
        """The directory of this round's samples, verdicts, pairs, reward model and training."""
        return self.root if self.round == 1 else self.root / f"round-{self.round}"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def state(self) -> Path:
        return self.root / "stages.json"

    @property
    def prompts(self) -> Path:
        return self.root / "prompts.jsonl"

    @property
    def judge_cache(self) -> Path:
        return self.root / "judge_cache.sqlite"

    @property
    def ref_logps(self) -> Path:
        """MM-DPO's reference log-prob cache: outside train/, which a settings change clears."""
        return self.root / "ref_logps"

    @property
    def sft(self) -> Path:
        return self.root / "sft"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def samples(self) -> Path:
        return self.work / "samples.jsonl"

    @property
    def verdicts(self) -> Path:
        return self.work / "verdicts.jsonl"

    @property
    def pairs(self) -> Path:
        return self.work / "pairs.jsonl"

    @property
    def train(self) -> Path:
        return self.work / "train"

    @property
    def adapter(self) -> Path:
        return self.train / "adapter"

    @property
    def model(self) -> Path:
        """The fully fine-tuned policy (`finetune: full`), instead of `adapter`."""
        return self.train / "model"

    @property
    def reward_model(self) -> Path:
        return self.work / "reward_model"

    @property
    def rm_scores(self) -> Path:
        return self.work / "rm_scores.jsonl"


def stage_key(name: str, round: int) -> str:
    """The key of a stage's state in stages.json: `name` in round 1, `name@round-r` after."""
    return name if round == 1 else f"{name}@round-{round}"


class ConfigView:
    """The recipe as one stage may see it: only the dotted keys the stage declared.

    `view.sample.template` works when the stage declared `sample` or `sample.template`; any other
    key raises, naming the stage and the key, so an undeclared (unfingerprinted) read fails loudly.
    """

    def __init__(self, node: Any, allowed: dict[str, Any] | None, stage: str, prefix: str = ""):
        self._node, self._allowed, self._stage, self._prefix = node, allowed, stage, prefix

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        key = f"{self._prefix}{name}"
        if self._allowed is not None and name not in self._allowed:
            raise AttributeError(
                f"stage {self._stage!r} reads recipe key {key!r} without declaring it in `config` "
                "(so its fingerprint would miss it)"
            )
        value = getattr(self._node, name)
        sub = None if self._allowed is None else self._allowed[name]
        if sub is not None and isinstance(value, BaseModel):
            return ConfigView(value, sub, self._stage, key + ".")
        return value


def _tree(paths: tuple[str, ...]) -> dict[str, Any]:
    """Dotted paths as a nested dict; None marks a whole subtree (`sample` allows all of it)."""
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        *parents, last = path.split(".")
        for p in parents:
            if node.get(p, {}) is None:
                break
            node = node.setdefault(p, {})
        else:
            node[last] = None
    return tree


def config_value(recipe: Section, path: str) -> Any:
    """The value at a dotted recipe path, dumped to JSON types (sections become dicts)."""
    value: Any = recipe
    for part in path.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _drop(tree: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        tree = tree.get(p)
        if not isinstance(tree, dict):
            return
    tree.pop(last, None)


class Context:
    """What a stage sees of its run: its config view, the run's paths, the policy lineage, the console.

    Built by the runner for one stage in one round; `step` lets a stage cache sub-results (eval's
    per-policy results, the merge between rounds) under the runner's skip/resume rule.
    """

    def __init__(self, recipe: Section, paths: RunPaths, stage: Stage | None, lineage: Lineage, console: Console,
                 step: Callable[..., dict[str, Any]]):  # fmt: skip
        self.recipe, self.paths, self.lineage, self.console, self._step = recipe, paths, lineage, console, step
        allowed = _tree(stage.config(recipe)) if stage is not None else None
        self.config: Any = ConfigView(recipe, allowed, stage.name if stage else "runner")

    @property
    def round(self) -> int:
        return self.paths.round

    def step(self, name: str, settings: dict[str, Any], reads: list[Path], output: Path,
             work: Callable[[str], dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
        """Run `work(fingerprint)` unless `output` exists under the same fingerprint (see `Runner`)."""
        return self._step(name, settings, reads, output, work)

    def tracking(self, name: str) -> Tracking:
        """Stage `name`'s tracker run in this round (`alignkit.tracking`; the stage declares `tracking`)."""
        from alignkit.tracking import Tracking

        return Tracking.for_stage(self.config.tracking, self.paths.root, stage_key(name, self.round))


class Lineage(Protocol):
    """The policy each round starts from and its identity (kept by the runner)."""

    def policy(self, round: int) -> str: ...

    def policy_identity(self, round: int) -> dict[str, Any]: ...

    def trained(self, round: int) -> tuple[str, str | None] | None: ...

    def fingerprint(self, key: str) -> str | None: ...


class Stage(Protocol):
    """One step of the pipeline; see the module docstring for what each member means."""

    name: ClassVar[str]
    per_round: ClassVar[bool]
    exclude: ClassVar[frozenset[str]]
    command: ClassVar[str]
    """The CLI command that runs it alone (usually `name`)."""

    def config(self, recipe: Section) -> tuple[str, ...]:
        """The dotted recipe keys it reads (`"sample"`, `"sample.template"`, `"seed"`)."""
        ...

    def reads(self, ctx: Context) -> list[Path]: ...

    def upstream(self, ctx: Context) -> dict[str, Any]: ...

    def output(self, ctx: Context) -> Path: ...

    def run(self, ctx: Context, fingerprint: str) -> dict[str, Any]: ...


def settings_of(stage: Stage, recipe: Section) -> dict[str, Any]:
    """The config part of a stage's fingerprint: its declared keys' values minus `exclude`."""
    settings = {path: config_value(recipe, path) for path in stage.config(recipe)}
    for dotted in stage.exclude:
        for path in list(settings):
            if dotted == path:
                del settings[path]
            elif dotted.startswith(path + ".") and isinstance(settings[path], dict):
                _drop(settings[path], dotted[len(path) + 1 :])
    return settings


def digest(settings: dict[str, Any], files: list[Path], root: Path) -> str:
    """sha256 over settings and file contents; files inside the run directory are named relative to it."""

    def name(p: Path) -> str:
        p = Path(p).resolve()
        return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)

    payload = {"settings": settings, "files": {name(p): file_digest(p) for p in files}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def identity(stage: Stage, ctx: Context) -> dict[str, Any]:
    """Everything but file contents that a stage's result depends on: its name, config and upstream."""
    return {"stage": stage.name, "config": settings_of(stage, ctx.recipe), "upstream": stage.upstream(ctx)}


def fingerprint(stage: Stage, ctx: Context) -> str:
    """A stage's fingerprint in a run: derived from its config, the files it reads and its upstream."""
    return digest(identity(stage, ctx), stage.reads(ctx), ctx.paths.root)


def require(paths: list[Path], stage: str) -> None:
    """Stop with a clear error when an input of `stage` does not exist yet."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        from alignkit.errors import StageInputError

        raise StageInputError(
            f"stage '{stage}' needs {', '.join(str(p) for p in missing)}; run the earlier stages first "
            f"(alignkit run RECIPE, or the stage command that writes it)"
        )


def launch_files(ctx: Context) -> list[Path]:
    """The accelerate config file of a distributed stage's launch, when set (it may set the mixed
    precision, so its bytes count)."""
    launch = ctx.config.launch.config_file
    return [Path(launch)] if launch else []


def template_files(template: str) -> list[Path]:
    """The template file when `template` is a path (its bytes count), [] for built-in names."""
    return [Path(template)] if Path(template).is_file() else []


def model_identity(name_or_path: str | None) -> str | None:
    """What identifies a model in fingerprints without hashing its weights.

    A local directory: its JSON files' bytes (config, tokenizer, adapter config) and every other
    file's name and size. A hub id or a `tiny:` name stands for itself.
    """
    if name_or_path is None:
        return None
    path = Path(name_or_path)
    if not path.is_dir():
        return str(name_or_path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes() if f.suffix == ".json" else str(f.stat().st_size).encode())
    return h.hexdigest()[:32]


__all__ = [
    "ConfigView", "Context", "Lineage", "RunPaths", "Stage", "config_value", "digest",
    "fingerprint", "identity", "model_identity", "require", "settings_of", "stage_key", "template_files",
]  # fmt: skip
