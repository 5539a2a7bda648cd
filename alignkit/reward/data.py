"""Reward-model inputs: pairs with critiques read from a pairs file, and their token encodings.

An answer is scored in one chat: the prompt, the answer, a user turn asking for a critique, and
the critique as the assistant's reply. The scalar head reads the last token (the critique's end
of turn). Without a critique the chat stops after the answer and the head reads the answer's end.
Critique tokens carry labels for the critique cross-entropy; everything else is -100. Encoding and
padding are `alignkit.models.inputs`'s, with left padding (critiques are generated from a batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from alignkit.data.preference import preference_row as _row
from alignkit.models.inputs import encode
from alignkit.records import RecordError, iter_jsonl, load_image

CRITIQUE_REQUEST = "Critique the answer above: name each claim the image does not support, then judge its correctness."
Messages = list[dict[str, Any]]


@dataclass
class RMPair:
    """A preference pair as the reward model trains on it; a critique of None trains the score only."""

    pair_id: str
    prompt_id: str
    prompt: Messages
    chosen: Messages
    rejected: Messages
    images: list[str]
    margin: float
    chosen_critique: str | None
    rejected_critique: str | None


def read_rm_pairs(path: str | Path) -> list[RMPair]:
    """Read a pairs file; rationales become critiques (empty or missing: no critique)."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: pairs file not found")
    pairs = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        row = _row(obj, path.parent, where, {})
        margin = obj.get("margin", 1.0)
        if not isinstance(margin, (int, float)):
            raise RecordError(f"{where}: 'margin' must be a number (pair_id={obj.get('pair_id')!r})")
        pairs.append(
            RMPair(
                pair_id=str(obj.get("pair_id", f"{path.name}:{lineno}")),
                prompt_id=str(obj.get("prompt_id", f"{path.name}:{lineno}")),
                prompt=row["prompt"],
                chosen=row["chosen"],
                rejected=row["rejected"],
                images=row["images"],
                margin=float(margin),
                chosen_critique=obj.get("chosen_rationale") or None,
                rejected_critique=obj.get("rejected_rationale") or None,
            )
        )
    if not pairs:
        raise RecordError(f"{path}: no preference pairs (the file is empty)")
    return pairs


def render(processor, prompt: Messages, answer: Messages, with_critique: bool) -> str:
    """The chat text up to where the critique starts, or the whole answer turn when there is none."""
    if with_critique:
        request = {"role": "user", "content": [{"type": "text", "text": CRITIQUE_REQUEST}]}
        return processor.apply_chat_template(prompt + answer + [request], tokenize=False, add_generation_prompt=True)
    # Stop at the answer's end-of-turn token (templates add a newline after it).
    return processor.apply_chat_template(prompt + answer, tokenize=False).rstrip()


def encode_answer(processor, prompt: Messages, answer: Messages, images: list[Image.Image], critique: str | None):
    """Encode one answer for scoring or training, with its critique (and end of text) labelled when given."""
    text = render(processor, prompt, answer, critique is not None)
    if critique is None:
        return encode(processor, text, images)
    tok = processor.tokenizer
    return encode(processor, text, images, tok(critique + tok.eos_token, add_special_tokens=False)["input_ids"])


def pair_features(processor, pair: RMPair, use_critiques: bool) -> tuple[dict, dict]:
    """Encoded (chosen, rejected) answers of a pair, with critiques when present and wanted."""
    images = [load_image(p) for p in pair.images]
    crit_c = pair.chosen_critique if use_critiques else None
    crit_r = pair.rejected_critique if use_critiques else None
    return (
        encode_answer(processor, pair.prompt, pair.chosen, images, crit_c),
        encode_answer(processor, pair.prompt, pair.rejected, images, crit_r),
    )
