"""Object mentions in free text, checked against a gold object list.

The reference judge and the hallucination metrics (CHAIR) both need to know which objects an
answer claims to see. Objects are "colour shape" phrases ("red square"); plurals and synonyms map
to one canonical name, and a shape named without a colour is still a mention (of the shape).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from alignkit.errors import RecordError

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")

# surface word -> canonical shape (plurals and synonyms, as CHAIR maps synonyms to one object)
SHAPE_WORDS: dict[str, str] = {
    "square": "square", "squares": "square", "box": "square", "boxes": "square",
    "circle": "circle", "circles": "circle", "disc": "circle", "discs": "circle",
    "disk": "circle", "disks": "circle", "ring": "circle", "rings": "circle",
    "triangle": "triangle", "triangles": "triangle",
}  # fmt: skip
COLOR_WORDS: dict[str, str] = {c: c for c in COLORS} | {"violet": "purple"}

_MENTION = re.compile(
    r"\b(?:(?P<color>" + "|".join(COLOR_WORDS) + r")\s+)?(?P<shape>" + "|".join(SHAPE_WORDS) + r")\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Mention:
    """One object mentioned in text; `color` is None when the text names only the shape."""

    shape: str
    color: str | None = None

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}" if self.color else self.shape


def find_mentions(text: str) -> list[Mention]:
    """All object mentions in `text`, in order, canonicalised ("Blue discs" -> blue circle)."""
    out = []
    for m in _MENTION.finditer(text):
        color = m.group("color")
        out.append(Mention(SHAPE_WORDS[m.group("shape").lower()], COLOR_WORDS[color.lower()] if color else None))
    return out


def parse_object(name: str) -> Mention:
    """Parse a gold object name such as "red square" (or "red squares") into a Mention."""
    found = find_mentions(name)
    if len(found) != 1:
        raise RecordError(
            f"gold object {name!r} is not a single 'colour shape' name (the reference judge and CHAIR know the "
            "shapes world only; judge other data with judge.backend=openai)"
        )
    return found[0]


def is_present(mention: Mention, gold: list[str]) -> bool:
    """Whether a mention is supported by the gold objects (a bare shape needs that shape only)."""
    objs = [parse_object(g) for g in gold]
    if mention.color is None:
        return any(o.shape == mention.shape for o in objs)
    return any(o.shape == mention.shape and o.color == mention.color for o in objs)
