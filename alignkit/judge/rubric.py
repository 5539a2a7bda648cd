"""Judge files (judges/*.yaml): loading, validation, prompt rendering and score combination.

A judge is one YAML file: `name`, `description`, `mode` (`single`: one answer per request, or
`pairwise`: two answers A/B), `system` and `user` prompt templates (Jinja2, sandboxed because users
write them), the verdict's JSON `schema` (rationale first, so the judge reasons before it scores),
the `scores` it combines into one number in [0, 1] (a numeric field, or the share of an array's
items whose boolean field is true), `sampling` defaults and an optional `price` per million tokens.
Errors name the file and the key.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2.sandbox import SandboxedEnvironment

from alignkit.errors import AlignkitError
from alignkit.resources import builtin_dir

MODES = ("single", "pairwise")
# Template variables per mode; the answer/response ones are untrusted and defused before rendering.
TEMPLATE_VARIABLES = {
    "single": ("question", "answer", "response", "reference_answer", "objects"),
    "pairwise": ("question", "answer_a", "response_a", "answer_b", "response_b", "reference_answer", "objects"),
}
TRUSTED_VARIABLES = ("question", "reference_answer", "objects")
WINNER = "winner"  # the pairwise verdict's field: "A", "B" or "tie"
WINNER_VALUES = ("A", "B", "tie")
PRICE_KEYS = {"prompt_per_million", "completion_per_million"}
SAMPLING_KEYS = {"temperature", "top_p", "max_tokens", "seed", "retry_max_tokens"}
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


class JudgeError(AlignkitError, ValueError):
    """A problem with the judge stage's settings or inputs; the message names what to fix."""


class RubricError(JudgeError):
    """A bad judge file; the message names the file and the key."""


@dataclass(frozen=True)
class ScoreField:
    """One score in the verdict: its range, its weight, and which end is good.

    With `share_of` set, the score is not a verdict field but the share of the items of the array
    `share_of` whose boolean `field` is true (0.0 for an empty array: an answer that claims nothing
    has nothing supported, so an empty answer never scores highest).
    """

    name: str
    low: float
    high: float
    weight: float
    higher_is_better: bool = True
    share_of: str | None = None
    field: str | None = None

    def value(self, verdict: dict[str, Any]) -> float:
        """The score in [0, 1], keeping its own direction."""
        if self.share_of is None:
            return (float(verdict[self.name]) - self.low) / (self.high - self.low)
        items = verdict[self.share_of]
        return sum(bool(item[self.field]) for item in items) / len(items) if items else 0.0


@dataclass(frozen=True)
class Price:
    """Price per million tokens, as the judge file gives it (the currency is the file's)."""

    prompt_per_million: float = 0.0
    completion_per_million: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt_per_million + completion_tokens * self.completion_per_million) / 1e6


@dataclass(frozen=True, eq=False)
class Rubric:
    """A loaded, validated judge file."""

    name: str
    description: str
    path: Path
    content_hash: str  # sha256 of the file bytes: the judge stage re-runs when it changes
    request_hash: str  # sha256 of what decides a reply (mode, templates, schema): part of every cache key
    mode: str
    schema: dict[str, Any]
    scores: tuple[ScoreField, ...]  # empty for pairwise: a sample's score is its win rate
    sampling: dict[str, Any]
    price: Price | None
    _system: jinja2.Template = field(repr=False)
    _user: jinja2.Template = field(repr=False)

    def render(
        self,
        *,
        question: str,
        reference_answer: str | None = None,
        objects: list[str] | None = None,
        **untrusted: str,
    ) -> tuple[str, str]:
        """The (system, user) prompt texts. `untrusted` holds the mode's answers and responses
        (`answer`, `response`; or `answer_a` ... `response_b`): any tag in them is defused so they
        cannot close the template's <answer> block and pose as prompt."""
        expected = set(TEMPLATE_VARIABLES[self.mode]) - set(TRUSTED_VARIABLES)
        if set(untrusted) != expected:
            raise JudgeError(f"{self.path}: a {self.mode} judge renders {sorted(expected)}, got {sorted(untrusted)}")
        values = dict(
            question=neutralise(question),  # from the user's data: as untrusted as the answers
            reference_answer=reference_answer,
            objects=objects,
            **{k: neutralise(v) for k, v in untrusted.items()},
        )
        return self._system.render(**values).strip(), self._user.render(**values).strip()

    def validate(self, verdict: Any) -> None:
        """Raise JudgeError naming every way `verdict` breaks the schema or a score's range."""
        errors = validate_instance(verdict, self.schema)
        if not errors:
            for s in self.scores:
                if s.share_of is not None:
                    continue
                v = verdict[s.name]
                if not s.low <= v <= s.high:
                    errors.append(f"{s.name}: {v} is outside the range [{s.low:g}, {s.high:g}]")
        if errors:
            raise JudgeError("; ".join(errors))

    def normalise(self, verdict: dict[str, Any]) -> dict[str, float]:
        """Each score mapped to [0, 1], keeping its own direction (hallucination stays 'higher is worse')."""
        return {s.name: s.value(verdict) for s in self.scores}

    def combine(self, normalised: dict[str, float]) -> float:
        """One score in [0, 1], higher is better: the weighted mean of the scores' good ends."""
        total = sum(s.weight for s in self.scores)
        good = 0.0
        for s in self.scores:
            v = normalised[s.name]
            good += s.weight * (v if s.higher_is_better else 1.0 - v)
        return good / total


def neutralise(text: str) -> str:
    """Defuse tag-like sequences in untrusted text: '</answer>' -> '‹/answer>', and so for chat
    special tokens ('<|im_end|>') and look-alikes that a model may read as a delimiter: fullwidth
    or small forms ('＜/answer＞', NFKC folds them) and HTML entities ('&lt;/answer&gt;')."""
    text = html.unescape(unicodedata.normalize("NFKC", text))
    return re.sub(r"<(?=[/|!A-Za-z_])", "‹", text)


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

    known = {"name", "description", "mode", "system", "user", "schema", "scores", "sampling", "price"}
    for key in data:
        if key not in known:
            raise err(key, f"unknown key (expected one of {sorted(known)})")
    mode = data.get("mode", "single")
    if mode not in MODES:
        raise err("mode", f"must be one of {list(MODES)}")
    for key in ("name", "system", "user", "schema", *(["scores"] if mode == "single" else [])):
        if key not in data:
            raise err(key, "required key missing")
    for key in ("name", "system", "user"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise err(key, "must be a non-empty string")

    schema = data["schema"]
    _check_schema(schema, "schema", err)
    _check_verdict_schema(schema, err)
    if mode == "pairwise":
        _check_pairwise(data, err)
        scores: tuple[ScoreField, ...] = ()
    else:
        scores = _parse_scores(data["scores"], schema, err)
    price = _parse_price(data.get("price"), err)
    sampling = data.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise err("sampling", "must be a mapping")
    for key in sampling:
        if key not in SAMPLING_KEYS:
            raise err(f"sampling.{key}", f"unknown sampling parameter (expected one of {sorted(SAMPLING_KEYS)})")

    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    templates = {}
    variables = TEMPLATE_VARIABLES[mode]
    trial = {v: ["red square"] if v == "objects" else v for v in variables}
    for key in ("system", "user"):
        try:
            templates[key] = env.from_string(data[key])
            templates[key].render(**trial)  # a trial render catches unknown variables now, not mid-run
        except jinja2.TemplateError as e:
            raise err(key, f"bad template ({e}); {mode} judges have the variables {', '.join(variables)}") from None

    # Only what decides the reply goes into cache keys: editing weights, price or description re-pays nothing.
    deciding = json.dumps([mode, data["system"], data["user"], schema], sort_keys=True)
    return Rubric(
        name=data["name"],
        description=str(data.get("description", "")).strip(),
        path=path,
        content_hash=hashlib.sha256(raw).hexdigest(),
        request_hash=hashlib.sha256(deciding.encode()).hexdigest(),
        mode=mode,
        schema=schema,
        scores=scores,
        sampling=sampling,
        price=price,
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


def _check_pairwise(data: dict[str, Any], err: Any) -> None:
    """A pairwise verdict names the winner as "A", "B" or "tie"; the score is derived, not declared."""
    if "scores" in data:
        raise err("scores", "not used by a pairwise judge (a sample's score is its win rate)")
    prop = data["schema"]["properties"].get(WINNER)
    if prop is None or prop.get("type") != "string" or sorted(prop.get("enum") or []) != sorted(WINNER_VALUES):
        raise err(f"schema.properties.{WINNER}", f"a pairwise judge needs a string property {WINNER!r} with enum {list(WINNER_VALUES)}")


def _parse_price(raw: Any, err: Any) -> Price | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw or set(raw) - PRICE_KEYS:
        raise err("price", f"must be a mapping with keys {sorted(PRICE_KEYS)}")
    for k, v in raw.items():
        if not _is_type(v, "number") or v < 0:
            raise err(f"price.{k}", "must be a number >= 0")
    return Price(**{k: float(v) for k, v in raw.items()})


def _parse_share(name: str, spec: dict[str, Any], schema: dict[str, Any], err: Any) -> ScoreField:
    """A score that is the share of an array's items whose boolean field is true."""
    key = f"scores.{name}"
    if name in schema["properties"]:
        raise err(key, "a share_of score is derived, so it must not also be a schema property")
    if set(spec) - {"share_of", "field", "weight", "higher_is_better"}:
        raise err(key, "a share_of score has keys share_of, field, weight, higher_is_better")
    array = schema["properties"].get(spec["share_of"]) or {}
    items = array.get("items") or {}
    item_field = (items.get("properties") or {}).get(spec.get("field")) or {}
    if array.get("type") != "array" or items.get("type") != "object" or item_field.get("type") != "boolean":
        raise err(
            f"{key}.share_of",
            "must name an array property of the schema whose items are objects with the boolean property `field`",
        )
    return ScoreField(name, 0.0, 1.0, _weight(spec, key, err), _hib(spec, key, err), spec["share_of"], spec["field"])


def _parse_scores(raw: Any, schema: dict[str, Any], err: Any) -> tuple[ScoreField, ...]:
    if not isinstance(raw, dict) or not raw:
        raise err("scores", "must map at least one score field to {range, weight, higher_is_better}")
    out = []
    for name, spec in raw.items():
        key = f"scores.{name}"
        if isinstance(spec, dict) and "share_of" in spec:
            out.append(_parse_share(name, spec, schema, err))
            continue
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
        out.append(ScoreField(name, float(rng[0]), float(rng[1]), _weight(spec, key, err), _hib(spec, key, err)))
    if sum(s.weight for s in out) <= 0:
        raise err("scores", "weights must not all be zero")
    return tuple(out)


def _weight(spec: dict[str, Any], key: str, err: Any) -> float:
    weight = spec.get("weight", 1.0)
    if not _is_type(weight, "number") or weight < 0:
        raise err(f"{key}.weight", "must be a number >= 0")
    return float(weight)


def _hib(spec: dict[str, Any], key: str, err: Any) -> bool:
    hib = spec.get("higher_is_better", True)
    if not isinstance(hib, bool):
        raise err(f"{key}.higher_is_better", "must be true or false")
    return hib
