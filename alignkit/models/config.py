"""The `policy` section: the model every round starts from."""

from __future__ import annotations

from alignkit.config import Section


class PolicyConfig(Section):
    model: str = "tiny:qwen2-vl"
    """Hub id, local path, or a tiny model built offline: `tiny:qwen2-vl`, `tiny:llava`, `tiny:gemma3`, ... (`alignkit.models.BUILDERS`)."""
    adapter: str | None = None
    """A PEFT adapter directory to sample from (e.g. the previous round's checkpoint)."""
