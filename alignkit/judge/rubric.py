"""Judge files (judges/*.yaml): loading, validation, prompt rendering and score combination.

A judge is one YAML file: `name`, `description`, `system` and `user` prompt templates (Jinja2,
sandboxed because users write them), the verdict's JSON `schema` (rationale first, so the judge
reasons before it scores), the `scores` it combines into one number in [0, 1], and `sampling`
defaults. Errors name the file and the key.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2.sandbox import SandboxedEnvironment

from alignkit.resources import builtin_dir

TEMPLATE_VARIABLES = ("question", "answer", "response", "reference_answer", "objects")
SAMPLING_KEYS = {"temperature", "top_p", "max_tokens", "seed"}
RATIONALE = "rationale"
# The JSON-schema subset the verdict validator enforces; other keywords are refused at load
# time, so a schema is never silently checked more loosely than it reads.
SCHEMA_KEYWORDS = {
    "type", "properties", "required", "additionalProperties", "enum",
    "minimum", "maximum", "items", "description", "title",
}  # fmt: skip
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int, float), "number": (int, float), "null": (type(None),),
}  # fmt: skip


class JudgeError(ValueError):
    """A problem with the judge stage's settings or inputs; the message names what to fix."""


class RubricError(JudgeError):
    """A bad judge file; the message names the file and the key."""


@dataclass(frozen=True)
class ScoreField:
    """One score in the verdict: its range, its weight, and which end is good."""

    name: str
    low: float
    high: float
    weight: float
    higher_is_better: bool = True


@dataclass(frozen=True, eq=False)
class Rubric:
    """A loaded, validated judge file."""

    name: str
    description: str
    path: Path
    content_hash: str  # sha256 of the file bytes: part of every cache key
    schema: dict[str, Any]
    scores: tuple[ScoreField, ...]
    sampling: dict[str, Any]
    _system: jinja2.Template = field(repr=False)
    _user: jinja2.Template = field(repr=False)

    def render(
        self,
        *,
        question: str,
        answer: str,
        response: str,
        reference_answer: str | None = None,
        objects: list[str] | None = None,
    ) -> tuple[str, str]:
        """The (system, user) prompt texts. The answer and response are untrusted: any tag in
        them is defused so they cannot close the template's <answer> block and pose as prompt."""
        values = dict(
            question=question,
            answer=neutralise(answer),
            response=neutralise(response),
            reference_answer=reference_answer,
            objects=objects,
        )
        return self._system.render(**values).strip(), self._user.render(**values).strip()

    def validate(self, verdict: Any) -> None:
        """Raise JudgeError naming every way `verdict` breaks the schema or a score's range."""
        errors = validate_instance(verdict, self.schema)
        if not errors:
            for s in self.scores:
                v = verdict[s.name]
                if not s.low <= v <= s.high:
                    errors.append(f"{s.name}: {v} is outside the range [{s.low:g}, {s.high:g}]")
        if errors:
            raise JudgeError("; ".join(errors))

    def normalise(self, verdict: dict[str, Any]) -> dict[str, float]:
        """Each score mapped to [0, 1], keeping its own direction (hallucination stays 'higher is worse')."""
        return {s.name: (float(verdict[s.name]) - s.low) / (s.high - s.low) for s in self.scores}

    def combine(self, normalised: dict[str, float]) -> float:
        """One score in [0, 1], higher is better: the weighted mean of the scores' good ends."""
        total = sum(s.weight for s in self.scores)
        good = 0.0
        for s in self.scores:
            v = normalised[s.name]
            good += s.weight * (v if s.higher_is_better else 1.0 - v)
        return good / total


def neutralise(text: str) -> str:
    """Defuse tag-like sequences ('</answer>' -> '‹/answer>') in untrusted text."""
    return re.sub(r"<(?=/?[A-Za-z_])", "‹", text)


def validate_instance(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Errors of `value` against the supported JSON-schema subset (empty when valid)."""
    where = path or "verdict"
    errors: list[str] = []
    expected = schema.get("type")
    if expected is not None:
        types = expected if isinstance(expected, list) else [expected]
        if not any(_is_type(value, t) for t in types):
            return [f"{where}: expected {expected}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if _is_type(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: {value} is above the maximum {schema['maximum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path + '.' if path else ''}{key}: required field missing")
        for key, v in value.items():
            sub = f"{path}.{key}" if path else key
            if key in props:
                errors += validate_instance(v, props[key], sub)
            elif schema.get("additionalProperties") is False:
                errors.append(f"{sub}: unexpected field")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += validate_instance(v, schema["items"], f"{where}[{i}]")
    return errors


def _is_type(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    if name == "number" and isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, _TYPES.get(name, ()))


# ---------------------------------------------------------------------------------------------
# loading


def resolve_rubric_path(name_or_path: str | Path) -> Path:
    """A path as given, or a built-in judge's file by name ("overall" -> judges/overall.yaml)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or len(p.parts) > 1:
        if not p.is_file():
            raise RubricError(f"{p}: judge file not found")
        return p
    folder = builtin_dir("judges")
    path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(f.stem for f in folder.glob("*.yaml"))
        raise RubricError(f"unknown judge {str(name_or_path)!r}: built-ins are {known}, or give a path to a .yaml file")
    return path


def load_rubric(name_or_path: str | Path) -> Rubric:
    """Load and validate a judge file, by built-in name or by path."""
    path = resolve_rubric_path(name_or_path)
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise RubricError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise RubricError(f"{path}: expected a mapping of keys (name, system, user, schema, scores, sampling)")

    def err(key: str, msg: str) -> RubricError:
        return RubricError(f"{path}: {key}: {msg}")

    known = {"name", "description", "system", "user", "schema", "scores", "sampling"}
    for key in data:
        if key not in known:
            raise err(key, f"unknown key (expected one of {sorted(known)})")
    for key in ("name", "system", "user", "schema", "scores"):
        if key not in data:
            raise err(key, "required key missing")
    for key in ("name", "system", "user"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise err(key, "must be a non-empty string")

    schema = data["schema"]
    _check_schema(schema, "schema", err)
    _check_verdict_schema(schema, err)
    scores = _parse_scores(data["scores"], schema, err)
    sampling = data.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise err("sampling", "must be a mapping")
    for key in sampling:
        if key not in SAMPLING_KEYS:
            raise err(f"sampling.{key}", f"unknown sampling parameter (expected one of {sorted(SAMPLING_KEYS)})")

    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    templates = {}
    for key in ("system", "user"):
        try:
            templates[key] = env.from_string(data[key])
            # A trial render catches unknown variables now rather than mid-run.
            templates[key].render(
                question="q", answer="a", response="r", reference_answer="ref", objects=["red square"]
            )
        except jinja2.TemplateError as e:
            raise err(key, f"bad template ({e}); variables are {', '.join(TEMPLATE_VARIABLES)}") from None

    return Rubric(
        name=data["name"],
        description=str(data.get("description", "")).strip(),
        path=path,
        content_hash=hashlib.sha256(raw).hexdigest(),
        schema=schema,
        scores=scores,
        sampling=sampling,
        _system=templates["system"],
        _user=templates["user"],
    )


def _check_schema(schema: Any, key: str, err: Any) -> None:
    if not isinstance(schema, dict):
        raise err(key, "must be a mapping (a JSON schema)")
    for k in schema:
        if k not in SCHEMA_KEYWORDS:
            raise err(f"{key}.{k}", f"unsupported JSON-schema keyword (supported: {sorted(SCHEMA_KEYWORDS)})")
    types = schema.get("type")
    for t in types if isinstance(types, list) else [types] if types else []:
        if t not in _TYPES:
            raise err(f"{key}.type", f"unknown type {t!r}")
    for name, sub in (schema.get("properties") or {}).items():
        _check_schema(sub, f"{key}.properties.{name}", err)
    if "items" in schema:
        _check_schema(schema["items"], f"{key}.items", err)


def _check_verdict_schema(schema: dict[str, Any], err: Any) -> None:
    """The verdict is an object in the shape strict structured output accepts, rationale first."""
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
        raise err("schema", "must be an object schema with properties")
    props = list(schema["properties"])
    if schema.get("additionalProperties") is not False:
        raise err("schema.additionalProperties", "must be false (strict structured output requires it)")
    if sorted(schema.get("required") or []) != sorted(props):
        raise err("schema.required", f"must list every property {props} (strict structured output requires it)")
    if not props or props[0] != RATIONALE or schema["properties"][RATIONALE].get("type") != "string":
        raise err(
            "schema.properties",
            f"the first property must be {RATIONALE!r} of type string, so the judge explains before it scores",
        )


def _parse_scores(raw: Any, schema: dict[str, Any], err: Any) -> tuple[ScoreField, ...]:
    if not isinstance(raw, dict) or not raw:
        raise err("scores", "must map at least one score field to {range, weight, higher_is_better}")
    out = []
    for name, spec in raw.items():
        key = f"scores.{name}"
        prop = schema["properties"].get(name)
        if prop is None:
            raise err(key, "not a property of the schema")
        if prop.get("type") not in ("integer", "number"):
            raise err(key, "the schema property must be of type integer or number")
        if not isinstance(spec, dict) or set(spec) - {"range", "weight", "higher_is_better"}:
            raise err(key, "must be a mapping with keys range, weight, higher_is_better")
        rng = spec.get("range")
        numbers = isinstance(rng, list) and len(rng) == 2 and all(_is_type(v, "number") for v in rng)
        if not (numbers and rng[0] < rng[1]):
            raise err(f"{key}.range", "must be [low, high] numbers with low < high")
        for bound, value in (("minimum", rng[0]), ("maximum", rng[1])):
            if bound in prop and prop[bound] != value:
                raise err(f"{key}.range", f"disagrees with the schema's {bound} {prop[bound]}")
        weight = spec.get("weight", 1.0)
        if not _is_type(weight, "number") or weight < 0:
            raise err(f"{key}.weight", "must be a number >= 0")
        hib = spec.get("higher_is_better", True)
        if not isinstance(hib, bool):
            raise err(f"{key}.higher_is_better", "must be true or false")
        out.append(ScoreField(name, float(rng[0]), float(rng[1]), float(weight), hib))
    if sum(s.weight for s in out) <= 0:
        raise err("scores", "weights must not all be zero")
    return tuple(out)
