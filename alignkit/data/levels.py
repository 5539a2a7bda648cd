"""AlignGPT-style alignment levels: a CLIP image–text similarity per prompt, bucketed into N levels.

AlignGPT (Zhao et al. 2024, "AlignGPT: Multi-modal Large Language Models with Adaptive Alignment
Capability", arXiv:2405.14129, §3.2) scores every image–caption pair of its pre-training data by
CLIP similarity, sorts the pairs by score and buckets them into N discrete alignment levels, a
higher level for a higher score. N = 8 in their code (`AlignIndicator(n_indicators=8)` in
AlignGPT-VL/AlignGPT `src/model/multimodal_components/mm_align.py`); the repository ships only the
resulting level ids (`blip_laion_cc_sbu_558k_with_similarity_number.json`), not the bucketing
script, so alignkit uses equal-count buckets over the ranked scores (level 1 the least, N the most
aligned), which stays meaningful however CLIP's scores are spread. It does this over a run's
prompts: the text is the prompt's reference answer (the closest thing to AlignGPT's captions) or
its question (`levels.text`).
The level goes into prompts.jsonl (`level`, with `clip_similarity`) and from there into every
pair built from the prompt; `levels.min_level` keeps only prompts at or above a level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from alignkit.config import Section
from alignkit.errors import ModelError, StageInputError
from alignkit.records import Prompt, load_image

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPProcessor

BATCH_SIZE = 32  # image–text pairs per CLIP forward pass


class LevelsConfig(Section):
    model: str = "openai/clip-vit-large-patch14-336"
    """A CLIP checkpoint: a local directory, a Hub id, or `tiny:clip` (random weights, for tests).
    The default is the CLIP AlignGPT builds on."""
    num_levels: int = Field(8, ge=2)
    """Alignment levels (AlignGPT uses 8); each holds an equal share of the prompts."""
    text: Literal["reference", "question"] = "reference"
    """What CLIP compares with the image: the reference answer (a caption, as AlignGPT) or the question."""
    min_level: int = Field(1, ge=1)
    """Keep only prompts at this level or above (1 keeps all)."""

    @model_validator(mode="after")
    def _min_within(self) -> "LevelsConfig":
        if self.min_level > self.num_levels:
            raise ValueError(f"levels.min_level ({self.min_level}) is above levels.num_levels ({self.num_levels})")
        return self


def bucket(scores: list[float], num_levels: int) -> list[int]:
    """Equal-count levels 1..`num_levels` by rank: the i-th lowest of n scores gets 1 + i*N//n.

    Equal scores share the level of the first of them, so a level never splits a tie.
    """
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    levels = [0] * len(scores)
    first_rank: dict[float, int] = {}
    for rank, i in enumerate(order):
        r = first_rank.setdefault(scores[i], rank)
        levels[i] = 1 + r * num_levels // len(scores)
    return levels


def load_clip(name: str) -> tuple[CLIPModel, CLIPProcessor]:
    """A CLIP model and processor from a directory, Hub id or `tiny:clip`; anything else is a clear error."""
    from transformers import AutoConfig, CLIPModel, CLIPProcessor

    from alignkit.models.device import process_state
    from alignkit.models.loading import resolve_model

    try:
        path = resolve_model(name)
        model_type = AutoConfig.from_pretrained(path).model_type
    except (ModelError, OSError, ValueError) as e:
        raise ModelError(f"levels.model: cannot load a CLIP model from {name!r}: {str(e).splitlines()[0]}") from None
    if model_type != "clip":
        raise ModelError(f"levels.model: {name!r} is a {model_type!r} model, not CLIP")
    model = CLIPModel.from_pretrained(path).eval().to(process_state().device)  # the GPU when there is one
    return model, CLIPProcessor.from_pretrained(path)


def similarities(model: CLIPModel, processor: CLIPProcessor, pairs: list[tuple[str, str]]) -> list[float]:
    """The cosine similarity of CLIP's projected image and text embeddings for each (image path, text)."""
    import torch

    out: list[float] = []
    max_length = model.config.text_config.max_position_embeddings
    for start in range(0, len(pairs), BATCH_SIZE):
        batch = pairs[start : start + BATCH_SIZE]
        inputs = processor(text=[t for _, t in batch], images=[load_image(p) for p, _ in batch],
                           return_tensors="pt", padding=True, truncation=True, max_length=max_length).to(model.device)  # fmt: skip
        with torch.no_grad():
            result = model(**inputs)
        # image_embeds and text_embeds come L2-normalised, so the row-wise dot product is the cosine
        out += (result.image_embeds * result.text_embeds).sum(-1).tolist()
    return out


def annotate_levels(prompts: list[Prompt], config: LevelsConfig) -> list[Prompt]:
    """Set each prompt's `clip_similarity` (the mean over its images) and `level`; keep those at
    `min_level` or above."""
    pairs, owner = [], []
    for n, p in enumerate(prompts):
        text = p.reference_answer if config.text == "reference" else p.question
        if not text:
            raise StageInputError(f"levels.text={config.text}: prompt {p.prompt_id!r} has no "
                                  f"{'reference_answer' if config.text == 'reference' else 'question'} "
                                  "to compare with its image (set levels.text=question?)")  # fmt: skip
        if not p.images:
            raise StageInputError(f"levels: prompt {p.prompt_id!r} has no image to score")
        pairs += [(image, text) for image in p.images]
        owner += [n] * len(p.images)
    model, processor = load_clip(config.model)
    sums = [0.0] * len(prompts)
    for n, s in zip(owner, similarities(model, processor, pairs)):
        sums[n] += s
    scores = [total / len(p.images) for total, p in zip(sums, prompts)]
    for p, score, level in zip(prompts, scores, bucket(scores, config.num_levels)):
        p.clip_similarity, p.level = score, level
    return [p for p in prompts if p.level >= config.min_level]
