"""Object mentions in free text, checked against a gold object list, under an object vocabulary.

The reference judge and the hallucination metric (CHAIR) both need to know which objects an answer
claims to see. A `Vocabulary` maps every surface form (synonyms and their plurals) to one canonical
object name, as CHAIR does (Rohrbach et al. 2018). Three kinds ship or load here:

- `shapes` (the default): the synthetic world's "colour shape" objects; a colour is an attribute, and a
  shape named without a colour is still a mention (of the shape).
- `coco`: COCO's 80 categories with CHAIR's synonym list (data/vocabularies/coco_synonyms.txt) and the
  double-word rules of the published chair.py ("hot dog" is not a dog, "baby bird" is not a person).
- a user's YAML file (see `load_vocabulary_file`).

Text is lower-cased and split into word tokens (hyphenated words stay one token, as in nltk's
tokenizer); the longest known phrase starting at each token wins, left to right.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignkit.errors import RecipeError, RecordError

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
COLOR_WORDS: dict[str, str] = {c: c for c in COLORS} | {"violet": "purple"}
BUILTIN_VOCABULARIES: tuple[str, ...] = ("shapes", "coco")

_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_DATA = Path(__file__).resolve().parent / "data" / "vocabularies"
_IRREGULAR_PLURALS = {
    "person": "people", "child": "children", "mouse": "mice", "goose": "geese", "ox": "oxen",
    "foot": "feet", "tooth": "teeth", "sheep": "sheep", "fish": "fish", "deer": "deer",
}  # fmt: skip


def plurals(word: str) -> list[str]:
    """English plural forms of a (lower-case) word or phrase: the last word is inflected."""
    head, _, last = word.rpartition(" ")
    prefix = head + " " if head else ""
    if last in _IRREGULAR_PLURALS:
        forms = [_IRREGULAR_PLURALS[last]]
    elif last.endswith("man"):
        forms = [last[:-3] + "men"]  # woman, policeman, gentleman
    elif last.endswith("child"):
        forms = [last + "ren"]
    elif re.search(r"(?:s|x|z|ch|sh)$", last):
        forms = [last + "es"]
    elif re.search(r"[^aeiou]y$", last):
        forms = [last[:-1] + "ies"]
    elif last.endswith("o"):
        forms = [last + "s", last + "es"]
    elif re.search(r"(?:ife|lf|eaf|oaf)$", last):
        forms = [re.sub(r"(?:fe|f)$", "ves", last), last + "s"]
    else:
        forms = [last + "s"]
    return [prefix + f for f in forms]


@dataclass(frozen=True)
class Mention:
    """One object mentioned in text; `attribute` (a colour in the shapes world) is None when unnamed."""

    object: str
    attribute: str | None = None

    @property
    def name(self) -> str:
        return f"{self.attribute} {self.object}" if self.attribute else self.object


@dataclass(frozen=True)
class Form:
    """What a surface phrase means: the singular word it stands for, and its object (None: not an object)."""

    word: str
    canonical: str | None


@dataclass(frozen=True)
class Vocabulary:
    """Surface phrases -> objects, plus optional attribute words that may precede an object.

    `forms` holds every synonym and plural; a phrase whose canonical is None is known but names no
    object, so its words are not read on their own ("home plate" is no plate). `suppress` drops a
    word's mentions when another word is in the text (COCO: "seat" when "toilet" is there).
    """

    name: str
    forms: dict[str, Form]
    attributes: dict[str, str] = field(default_factory=dict)
    suppress: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @functools.cached_property
    def longest(self) -> int:
        return max((len(k.split()) for k in self.forms), default=1)

    @functools.cached_property
    def objects(self) -> tuple[str, ...]:
        """The canonical object names, in the order they were declared."""
        return tuple(dict.fromkeys(f.canonical for f in self.forms.values() if f.canonical))

    def find(self, text: str) -> list[Mention]:
        """All object mentions in `text`, in order, every occurrence, canonicalised."""
        tokens = _TOKEN.findall(text.lower())
        found: list[tuple[Form, str | None]] = []
        i = 0
        while i < len(tokens):
            for n in range(min(self.longest, len(tokens) - i), 0, -1):
                form = self.forms.get(" ".join(tokens[i : i + n]))
                if form is not None:
                    break
            else:
                i += 1
                continue
            before = tokens[i - 1] if i else None
            found.append((form, self.attributes.get(before) if before else None))
            i += n
        words = {f.word for f, _ in found}
        return [
            Mention(f.canonical, attr)
            for f, attr in found
            if f.canonical and not words.intersection(self.suppress.get(f.word, ()))
        ]

    def parse(self, name: str) -> Mention:
        """A gold object name ("red square", "dining table") as its one Mention."""
        found = self.find(name)
        if len(found) != 1:
            raise RecordError(
                f"gold object {name!r} is not one object of the {self.name!r} vocabulary (known: "
                f"{', '.join(self.objects[:8])}{', ...' if len(self.objects) > 8 else ''}); choose the "
                "vocabulary with eval.vocabulary, or judge other data with judge.backend=openai"
            )
        return found[0]

    def present(self, mention: Mention, gold: list[str]) -> bool:
        """Whether a mention is supported by the gold objects (an unqualified mention needs the object only)."""
        objs = [self.parse(g) for g in gold]
        if mention.attribute is None:
            return any(o.object == mention.object for o in objs)
        return any(o == mention for o in objs)


def build_vocabulary(
    name: str,
    objects: dict[str, list[str]],
    *,
    attributes: dict[str, list[str]] | None = None,
    irregular: dict[str, list[str]] | None = None,
    phrases: dict[str, str | None] | None = None,
    suppress: dict[str, tuple[str, ...]] | None = None,
) -> Vocabulary:
    """A vocabulary from canonical names -> synonyms; every name and synonym also matches its plurals.

    `irregular` gives extra plural forms of a word; `phrases` maps a phrase to the word it stands for
    (a canonical name or synonym) or to None (a phrase that names no object).
    """
    irregular = irregular or {}
    word_to_canonical = {s: c for c, syns in objects.items() for s in [c, *syns]}
    table: dict[str, Form] = {}

    def add(surface: str, form: Form) -> None:
        for s in [surface, *plurals(surface), *irregular.get(surface, [])]:
            table.setdefault(s, form)

    for word, canonical in word_to_canonical.items():
        add(word, Form(word, canonical))
    for phrase, word in (phrases or {}).items():
        add(phrase, Form(word or phrase, word_to_canonical.get(word) if word else None))
    attrs = {s: c for c, syns in (attributes or {}).items() for s in [c, *syns]}
    return Vocabulary(name, table, attrs, dict(suppress or {}))


SHAPES_WORLD = build_vocabulary(
    "shapes",
    {"square": ["box"], "circle": ["disc", "disk", "ring"], "triangle": []},
    attributes={c: [s for s, t in COLOR_WORDS.items() if t == c and s != c] for c in COLORS},
)


# chair.py's hard-coded rules for MSCOCO (Rohrbach et al. 2018, LisaAnne/Hallucination utils/chair.py):
# two-word phrases read as one word; "baby"/"adult" + animal is the animal, not a person;
# "passenger" + vehicle is the vehicle; "toilet seat" is a toilet and drops "seat" (not a chair).
_COCO_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "home plate", "train track",
)  # fmt: skip
_COCO_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")


@functools.cache
def coco_vocabulary() -> Vocabulary:
    """COCO's categories with CHAIR's synonyms, parsed and ruled as the published chair.py does.

    As there, a multi-word synonym matches only when it is one of the script's double words
    ("dining table" is found through its synonym "table"), and an entry the script cannot match
    (" motor bike" with its leading space, "iPhone" against lower-cased text) matches nothing.
    """
    lines = [ln.strip() for ln in (_DATA / "coco_synonyms.txt").read_text().splitlines()]
    groups = [ln.split(", ") for ln in lines if ln and not ln.startswith("#")]
    objects: dict[str, list[str]] = {}
    for group in groups:
        objects.setdefault(group[0], []).extend(s for s in group[1:] if " " not in s or s in _COCO_DOUBLE_WORDS)
    known = {s for group in groups for s in group}
    phrases: dict[str, str | None] = {d: None for d in _COCO_DOUBLE_WORDS if d not in known}
    phrases |= {f"{q} {a}": a if a in known else None for a in _COCO_ANIMALS for q in ("baby", "adult")}
    phrases |= {"passenger jet": "jet", "passenger train": "train", "bow tie": "tie", "toilet seat": "toilet"}
    return build_vocabulary("coco", objects, phrases=phrases, suppress={"seat": ("toilet",)})


def load_vocabulary_file(path: str | Path) -> Vocabulary:
    """A user's vocabulary from YAML, e.g.::

    objects:              # canonical name: its synonyms (plurals are added automatically)
      cup: [mug, teacup]
      dining table: [table, desk]
    plurals:              # optional: irregular plurals the English rules miss
      cactus: [cacti]
    phrases:              # optional: phrases that are one object (or none: null)
      hot dog: null
    attributes:           # optional: words that qualify an object ("red cup"), with synonyms
      red: [crimson]
    """
    path = Path(path)

    def err(key: str, msg: str) -> RecipeError:
        return RecipeError(f"{path}: {key}: {msg}" if key else f"{path}: {msg}")

    if not path.is_file():
        raise err(
            "", f"vocabulary file not found (eval.vocabulary is {', '.join(BUILTIN_VOCABULARIES)} or a YAML file)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise err("", f"not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise err("", "expected a mapping with an `objects` key (canonical name: [synonyms])")
    known = ("objects", "plurals", "phrases", "attributes")
    for key in data:
        if key not in known:
            raise err(str(key), f"unknown key (expected one of {list(known)})")
    if "objects" not in data:
        raise err("objects", "required key missing")

    def word(value: object, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise err(key, f"must be a non-empty string, got {value!r}")
        return " ".join(value.lower().split())

    def words_map(key: str, allow_null_values: bool = False) -> dict[str, list[str]]:
        node = data.get(key) or {}
        if not isinstance(node, dict) or (key == "objects" and not node):
            raise err(key, "must be a non-empty mapping" if key == "objects" else "must be a mapping")
        out: dict[str, list[str]] = {}
        for name, values in node.items():
            where = f"{key}.{name}"
            values = [] if values is None else [values] if isinstance(values, str) else values
            if not isinstance(values, list):
                raise err(where, f"must be a list of words, got {values!r}")
            out[word(name, where)] = [word(v, where) for v in values]
        return out

    objects = words_map("objects")
    seen: dict[str, str] = {}
    for canonical, syns in objects.items():
        for s in [canonical, *syns]:
            if seen.setdefault(s, canonical) != canonical:
                raise err(f"objects.{canonical}", f"{s!r} is already a name or synonym of {seen[s]!r}")
    phrases_node = data.get("phrases") or {}
    if not isinstance(phrases_node, dict):
        raise err("phrases", "must be a mapping of phrase: word (or null)")
    phrases = {}
    for phrase, target in phrases_node.items():
        where = f"phrases.{phrase}"
        target = None if target is None else word(target, where)
        if target is not None and target not in seen:
            raise err(where, f"{target!r} is not an object name or synonym of this vocabulary")
        phrases[word(phrase, where)] = target
    return build_vocabulary(
        path.name, objects, attributes=words_map("attributes"), irregular=words_map("plurals"), phrases=phrases
    )


def load_vocabulary(spec: str) -> Vocabulary:
    """`shapes`, `coco`, or the path of a YAML vocabulary file."""
    if spec == "shapes":
        return SHAPES_WORLD
    if spec == "coco":
        return coco_vocabulary()
    return load_vocabulary_file(spec)


def find_mentions(text: str, vocab: Vocabulary = SHAPES_WORLD) -> list[Mention]:
    """All object mentions in `text`, in order, canonicalised ("Blue discs" -> blue circle)."""
    return vocab.find(text)


def parse_object(name: str, vocab: Vocabulary = SHAPES_WORLD) -> Mention:
    """Parse a gold object name such as "red square" (or "red squares") into a Mention."""
    return vocab.parse(name)


def is_present(mention: Mention, gold: list[str], vocab: Vocabulary = SHAPES_WORLD) -> bool:
    """Whether a mention is supported by the gold objects (a bare shape needs that shape only)."""
    return vocab.present(mention, gold)
