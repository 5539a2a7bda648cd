"""The base of every recipe section: a typed, strict pydantic model.

Each stage's section lives beside the stage (e.g. `alignkit/sample/config.py`); `alignkit.recipe`
assembles them into the `Recipe`. A section declares each default once, with a one-line
docstring under every field.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
