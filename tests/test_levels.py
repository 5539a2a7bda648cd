"""AlignGPT-style alignment levels: equal-count bucketing, CLIP cosine similarity, the prompts stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alignkit.data.levels import LevelsConfig, annotate_levels, bucket, load_clip, similarities
from alignkit.errors import ModelError, RecipeError, StageInputError
from alignkit.models.tiny import tiny_model
from alignkit.pairs import make_pair
from alignkit.recipe import load_recipe
from alignkit.records import Prompt, Sample, Verdict, read_records
from alignkit.runner import Runner


@pytest.fixture(scope="module")
def clip_dir() -> Path:
    return tiny_model("tiny:clip")


def test_bucket_gives_equal_count_levels_by_rank():
    # sorted: .1 .2 | .3 .4 | .5 .6 | .7 .8 -> levels 1 1 2 2 3 3 4 4 (rank*4//8 + 1)
    assert bucket([0.30, 0.10, 0.80, 0.20, 0.50, 0.70, 0.40, 0.60], 4) == [2, 1, 4, 1, 3, 4, 2, 3]
    # ties share the level of their first rank: ranks 0,1,2 -> level 1; rank 3 -> 1 + 3*2//4 = 2
    assert bucket([0.5, 0.5, 0.5, 0.9], 2) == [1, 1, 1, 2]
    # 9 scores into 4 levels: ranks 0-2 -> 1, 3-4 -> 2, 5-6 -> 3, 7-8 -> 4 (1 + rank*4//9)
    assert bucket([float(i) for i in range(9)], 4) == [1, 1, 1, 2, 2, 3, 3, 4, 4]


def test_similarity_is_the_cosine_of_clips_projected_embeddings(clip_dir, tmp_path):
    Image.new("RGB", (90, 70), (200, 30, 30)).save(tmp_path / "a.png")
    model, processor = load_clip(str(clip_dir))
    text = "a red square and a blue circle"
    [got] = similarities(model, processor, [(str(tmp_path / "a.png"), text)])
    # by hand: CLS token after the post-layernorm, and the text state at the first end-of-text token
    inputs = processor(text=[text], images=[Image.open(tmp_path / "a.png").convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        vision = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state[0, 0]
        image_vec = model.visual_projection(model.vision_model.post_layernorm(vision)).numpy()
        ids = inputs["input_ids"][0].tolist()
        hidden = model.text_model(input_ids=inputs["input_ids"]).last_hidden_state[0]
        text_vec = model.text_projection(hidden[ids.index(model.config.text_config.eos_token_id)]).numpy()
    cosine = float(image_vec @ text_vec / (np.linalg.norm(image_vec) * np.linalg.norm(text_vec)))
    assert got == pytest.approx(cosine, abs=1e-5)


def test_prompts_stage_annotates_levels_and_filters_by_min_level(clip_dir, tmp_path):
    def run(min_level: int) -> tuple[dict, list[Prompt]]:
        (tmp_path / "r.yaml").write_text(f"""\
output_dir: {tmp_path / "run"}
data: {{synthetic: {{num_prompts: 8, seed: 1, tasks: [describe]}}}}
levels: {{model: {clip_dir}, num_levels: 4, min_level: {min_level}}}
""")
        summary = Runner(load_recipe(tmp_path / "r.yaml")).run(["prompts"])["prompts"]
        return summary, read_records(tmp_path / "run" / "prompts.jsonl", Prompt)

    summary, every = run(1)
    assert len(every) == 8 and summary["per_level"] == {"1": 2, "2": 2, "3": 2, "4": 2}
    ranked = sorted(every, key=lambda p: p.clip_similarity)
    assert len({p.clip_similarity for p in every}) == 8  # no ties: each level holds exactly 2
    assert [p.level for p in ranked] == [1, 1, 2, 2, 3, 3, 4, 4]
    summary, kept = run(3)  # a changed levels key re-runs the stage: the two top levels, 4 of 8 prompts
    assert summary["num_scored"] == 8 and summary["num_prompts"] == 4
    assert {p.prompt_id: p.level for p in kept} == {p.prompt_id: p.level for p in ranked[4:]}
    assert json.loads((tmp_path / "run" / "prompts.jsonl").read_text().splitlines()[0])["level"] >= 3
    # a pair carries its prompt's level
    sample = lambda i: Sample(f"{kept[0].prompt_id}#s{i}", kept[0].prompt_id, "x", "", "x", True, 1, "stop")  # noqa: E731
    verdict = lambda i, s: Verdict(f"{kept[0].prompt_id}#s{i}", kept[0].prompt_id, "j", "ok", s)  # noqa: E731
    pair = make_pair(kept[0], "q", (sample(0), verdict(0, 1.0)), (sample(1), verdict(1, 0.0)))
    assert pair.level == kept[0].level


def test_bad_clip_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="levels.model: cannot load a CLIP model from"):
        load_clip(str(tmp_path / "missing"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelError, match="is a 'bert' model, not CLIP"):
        load_clip(str(tmp_path / "bert"))


def test_bad_levels_settings_and_prompts_are_clear_errors(tmp_path):
    (tmp_path / "r.yaml").write_text("output_dir: run\ndata: {synthetic: {}}\nlevels: {num_levels: 4, min_level: 5}\n")
    with pytest.raises(RecipeError, match="min_level"):
        load_recipe(tmp_path / "r.yaml")
    no_reference = Prompt("p1", "What is this?", ["a.png"])
    with pytest.raises(StageInputError, match="prompt 'p1' has no reference_answer"):
        annotate_levels([no_reference], LevelsConfig(model="unused"))
