"""Example lengths counted with their image tokens, and what a stage does with an example over its limit.

A processor expands each image placeholder into the family's image tokens (Qwen2-VL: one per
merged patch, so a larger image is longer; Gemma 3, LLaVA: a fixed count per image), so the text's
length says little about an example's length in tokens. Before it trains or scores, every stage
counts each example after that expansion and compares it with its limit:

- DPO and MM-DPO: `train.max_length`. TRL's vision collator keeps the first max_length tokens of
  prompt + answer, so a longer pair would lose the end of its answers, or, when the limit falls
  inside or before its image tokens, crash the forward ("Image features and image tokens do not
  match"). Its length is counted by that very collator, with nothing cut.
- SFT, PPO (prompt + `sample.max_new_tokens`), the reward model's training and its scoring
  (prompt + answer + critique request + `reward_model.max_critique_tokens`): they never truncate;
  their limit is the model's context, `max_position_embeddings` of its language model.

An example over its limit is never cut. `overlong: stop` (the default of `train`, `sft` and
`reward_model`) stops the stage before any work, with an error naming every such example's id,
its length and where its image tokens end; `skip` leaves those examples out, warns with their ids
and counts them in the stage's summary (`overlong_skipped`, `overlong_ids`); the training functions
that return only their model's path leave those ids in `out_dir/overlong.json` for their stage.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from alignkit.errors import StageInputError
from alignkit.models.inputs import placeholder_ids
from alignkit.records import write_atomic

Overlong = Literal["stop", "skip"]
CONTEXT = "the model's context (max_position_embeddings)"
"""How errors name the limit of the stages that never truncate."""
SHOWN = 10
"""Ids an error or warning lists before it says how many more there are."""


@dataclass(frozen=True)
class Length:
    """One example's length in tokens, image tokens included, and the index just past its last image token (0: none)."""

    id: str
    tokens: int
    image_end: int


def image_end(input_ids: Iterable[int], image_ids: set[int] | frozenset[int]) -> int:
    """The index just past the last of `image_ids` in `input_ids`; 0 when there is none."""
    return max((i + 1 for i, t in enumerate(input_ids) if t in image_ids), default=0)


def context_length(config: Any) -> int | None:
    """The model's context: `max_position_embeddings` of its language model (None if it has none)."""
    value = getattr(config.get_text_config(), "max_position_embeddings", None)
    return value if isinstance(value, int) else None


def example_length(id_: str, input_ids: Sequence[int], config: Any, extra: int = 0) -> Length:
    """`Length` of encoded `input_ids` (`alignkit.models.inputs.encode`), plus `extra` tokens still to
    be generated; the image tokens are the ids `config`'s model fills with image features."""
    ids = [int(t) for t in input_ids]
    return Length(id_, len(ids) + extra, image_end(ids, placeholder_ids(config)))


def preference_lengths(processor: Any, dataset: Any, ids: Sequence[str], config: Any) -> list[Length]:
    """Each pair's length as TRL 1.16's `DataCollatorForVisionPreference` builds its rows (prompt with
    images, then the longer of chosen and rejected), counted by that collator with nothing cut."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    collator = DataCollatorForVisionPreference(processor=processor, max_length=None)
    image_ids = placeholder_ids(config)
    columns = ("prompt", "chosen", "rejected")
    out = []
    for id_, row in zip(ids, dataset.select_columns([*columns, "images"]), strict=True):
        # the collator rewrites the messages in place: give it copies
        batch = collator([{**copy.deepcopy({k: row[k] for k in columns}), "images": row["images"]}])
        lengths = batch["attention_mask"].sum(1)  # rows: chosen, rejected (flushed left)
        longest = int(lengths.argmax())
        out.append(Length(id_, int(lengths[longest]), image_end(batch["input_ids"][longest].tolist(), image_ids)))
    return out


def over_limit(lengths: Sequence[Length], limit: int | None, overlong: Overlong, what: str) -> set[str]:
    """The ids of `lengths` over `limit` (None: no limit) that a stage leaves out under `overlong: skip`;
    under `stop` a `StageInputError` naming them. `what` names the limit and the key that sets it."""
    over = [x for x in lengths if limit is not None and x.tokens > limit]
    if not over:
        return set()
    listed = ", ".join(
        f"{x.id} ({x.tokens} tokens" + (f", image tokens end at {x.image_end})" if x.image_end else ")")
        for x in over[:SHOWN]
    )
    more = f" and {len(over) - SHOWN} more" if len(over) > SHOWN else ""
    message = (
        f"{len(over)} of {len(lengths)} examples are longer than {what} ({limit} tokens, image tokens counted): "
        f"{listed}{more}"
    )
    if overlong == "stop":
        raise StageInputError(
            f"{message}. Raise the limit, use smaller images, or set overlong: skip to leave them out."
        )
    if len(over) == len(lengths):
        raise StageInputError(f"{message}: nothing is left to run on.")
    warnings.warn(f"{message}; skipped (overlong: skip).", stacklevel=2)
    return {x.id for x in over}


SKIPPED = "overlong.json"
"""The file in a training run's directory that holds the ids it skipped as overlong."""


def write_skipped(out_dir: Path, skipped: Iterable[str]) -> None:
    """Record the ids a run skipped as overlong in `out_dir/overlong.json` (an empty list: none)."""
    write_atomic(Path(out_dir) / SKIPPED, json.dumps(sorted(skipped)))


def skipped_summary(skipped: Iterable[str] | Path) -> dict[str, Any]:
    """The stage-summary entries (stages.json) for the ids skipped as overlong, given as ids or as
    the run directory that `write_skipped` wrote them to; the first 100 ids are listed."""
    if isinstance(skipped, Path):
        file = skipped / SKIPPED
        skipped = json.loads(file.read_text(encoding="utf-8")) if file.exists() else []
    ids = sorted(skipped)
    return {"overlong_skipped": len(ids), "overlong_ids": ids[:100]}
