"""The recipe: one YAML file parsed once into typed sections, with `section.key=value` overrides.

Errors name the key, the file and (when the key is in the file) its line. Secrets never live in a
recipe: API keys are read from the environment variable the recipe names (`judge.api_key_env`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from alignkit.config import Section
from alignkit.data.config import DataConfig
from alignkit.data.levels import LevelsConfig
from alignkit.errors import RecipeError
from alignkit.evaluate.config import EvalConfig
from alignkit.judge.config import JudgeConfig
from alignkit.launch import LaunchConfig
from alignkit.models.config import PolicyConfig
from alignkit.pairs.config import PairsConfig
from alignkit.records import HUB_PREFIX
from alignkit.reward.config import RewardModelConfig
from alignkit.sample.config import SampleConfig
from alignkit.stages import DEFAULT_STAGES, STAGE_NAMES
from alignkit.tracking import TrackingConfig
from alignkit.train.config import GrpoConfig, PpoConfig, SftConfig, TrainConfig


class Recipe(Section):
    output_dir: str
    """Run directory (relative to the current directory)."""
    seed: int = 0
    stages: list[Literal[STAGE_NAMES]] = list(DEFAULT_STAGES)
    policy: PolicyConfig = PolicyConfig()
    data: DataConfig
    levels: LevelsConfig | None = None
    """AlignGPT-style alignment levels of the prompts by CLIP similarity (`alignkit.data.levels`); off by default."""
    sample: SampleConfig = SampleConfig()
    judge: JudgeConfig = JudgeConfig()
    pairs: PairsConfig = PairsConfig()
    train: TrainConfig = TrainConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    ppo: PpoConfig = PpoConfig()
    grpo: GrpoConfig = GrpoConfig()
    sft: SftConfig | None = None
    eval: EvalConfig | None = None
    tracking: TrackingConfig = TrackingConfig()
    """Training curves and eval results to TensorBoard, wandb or Trackio (`alignkit.tracking`)."""
    launch: LaunchConfig = LaunchConfig()
    """Processes per distributed stage (`alignkit.launch`): `launch.num_processes=2` runs `sft`, and
    `train` with DPO or MM-DPO, as 2."""
    rounds: int = Field(1, ge=1)
    """Rounds of sample -> judge -> pairs -> train; each round samples with the previous round's policy."""


DATA_PATH_KEYS = (("data", "prompts"), ("data", "pairs"), ("sft", "data"), ("eval", "prompts"), ("judge", "calibration"))


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `section.key=value` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise RecipeError(f"override {override!r}: expected section.key=value")
    dotted, value = override.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise RecipeError(f"override {override!r}: expected section.key=value (an empty key)")
    node = raw
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {override!r}: {k!r} is not a section")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError as e:
        raise RecipeError(f"override {override!r}: the value is not valid YAML ({e})") from None


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted keys of a YAML mapping to their 1-based line numbers."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def _format_errors(err: ValidationError, source: str, key_lines: dict[str, int]) -> str:
    out = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        line = key_lines.get(key)
        where = f"{source}:{line}" if line else source
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"]
        out.append(f"{where}: {key or '(recipe)'}: {msg}")
    return "\n".join(out)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe YAML file, apply overrides, and validate it into a `Recipe`."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a recipe file" if path.is_dir() else "recipe file not found"
        raise RecipeError(f"{path}: {what} (built-in recipes: `alignkit recipes`)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read the recipe file ({e})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of sections")
    for o in overrides:
        apply_override(raw, o)
    # Relative data paths are relative to the recipe file, so a recipe runs from any directory.
    for section, key in DATA_PATH_KEYS:
        node = raw.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and not Path(value).is_absolute() and not value.startswith(HUB_PREFIX):
            node[key] = str((path.parent / value).resolve())
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        source = f"{path}" + (f" (with overrides {' '.join(overrides)})" if overrides else "")
        raise RecipeError(_format_errors(e, source, _key_lines(text))) from None


_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def redact(value: Any) -> Any:
    """A copy of a resolved recipe with secrets removed (credentials embedded in URLs)."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _URL_CREDENTIALS.sub("***@", value)
    return value


def resolved_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, secrets removed; saved in the run directory."""
    return yaml.safe_dump(redact(recipe.model_dump(mode="json")), sort_keys=False)
