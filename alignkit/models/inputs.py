"""Model inputs from image+text conversations: one encoder and one collator for SFT, PPO and the reward model.

`encode` runs a conversation (chat messages with image placeholders, or text already rendered by
the chat template) with its images through the processor and returns one example's features:
per-token tensors without the batch dim (input_ids, attention_mask, labels, mm_token_type_ids,
...) and every other processor output as it came (pixel_values, image_grid_thw, ...). Labels are
-100 everywhere but the completion, so the loss is on the completion only. `collate` pads a list
of such features into a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE = -100
Messages = list[dict[str, Any]]
Features = dict[str, torch.Tensor]


def encode(
    processor: Any,
    prompt: Messages | str,
    images: Sequence[Any] | None = None,
    completion: Messages | Sequence[int] | None = None,
) -> Features:
    """One example's features; `labels` are the completion's tokens, -100 elsewhere.

    `prompt` is a conversation (rendered with the generation prompt) or rendered text, taken as
    it is. `completion` is either assistant messages, rendered with the prompt as one conversation
    (the SFT format), or token ids appended to the prompt's tokens (sampled tokens, a critique).
    """
    images = list(images) if images else None
    if completion is None or isinstance(completion[0] if completion else 0, int):
        text = prompt if isinstance(prompt, str) else processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return extend(_tokenize(processor, text, images), list(completion or []))
    if isinstance(prompt, str):
        raise TypeError("a completion given as messages needs the prompt as messages too")
    full = _tokenize(processor, processor.apply_chat_template(prompt + list(completion), tokenize=False), images)
    prompt_text = processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    prompt_len = processor(text=[prompt_text], images=images, return_tensors="pt")["input_ids"].shape[1]
    full["labels"] = full["input_ids"].clone()
    full["labels"][:prompt_len] = IGNORE
    return full


def _tokenize(processor: Any, text: str, images: list | None) -> Features:
    """Text and images through the processor: per-token tensors lose the batch dim, the rest keep theirs; no labels."""
    enc = processor(text=[text], images=images, return_tensors="pt")
    seq = enc["input_ids"].shape[1]
    out = {k: v[0] if v.dim() == 2 and v.shape == (1, seq) else v for k, v in enc.items()}
    out["labels"] = torch.full((seq,), IGNORE, dtype=torch.long)
    return out


def extend(features: Features, token_ids: Sequence[int]) -> Features:
    """`features` with tokens appended as completion: labelled, attended, other per-token fields 0."""
    if not token_ids:
        return dict(features)
    length = len(features["input_ids"])
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    out = {}
    for key, value in features.items():
        if value.dim() == 1 and value.shape[0] == length:  # per-token
            tail = ids if key in ("input_ids", "labels") else torch.full_like(ids, int(key == "attention_mask"))
            out[key] = torch.cat([value, tail.to(value.dtype)])
        else:
            out[key] = value
    return out


def collate(features: Sequence[Features], pad_id: int, side: str = "right") -> Features:
    """A batch: per-token tensors padded on `side` (input_ids with `pad_id`, labels with -100, the
    rest with 0); per-image tensors (pixel_values, image_grid_thw) concatenated along dim 0.

    Training pads on the right; generation needs the left (the reward model's critiques).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(f["input_ids"]) for f in features)
    fills = {"input_ids": pad_id, "labels": IGNORE}
    batch: dict[str, list[torch.Tensor]] = {}
    for f in features:
        n = len(f["input_ids"])
        for key, value in f.items():
            if value.dim() == 1 and value.shape[0] == n:  # per-token
                pad = torch.full((width - n,), fills.get(key, 0), dtype=value.dtype)
                value = torch.cat([value, pad] if side == "right" else [pad, value])[None]
            batch.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in batch.items()}


def placeholder_ids(config: Any) -> set[int]:
    """The token ids a model replaces with image or video features, from its config.

    A sampled answer that contains one would be read as an image slot without pixels, so callers
    cut answers there. The processor's `image_token` is not always that id: Gemma 3's is
    `<start_of_image>`, while the model counts its soft tokens (`image_token_index`).
    """
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    return {value for name in names if isinstance(value := getattr(config, name, None), int)}
