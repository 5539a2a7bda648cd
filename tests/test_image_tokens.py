"""Image-token-aware lengths (`alignkit.models.lengths`): every stage that trains or scores counts an
example with its image tokens and stops (naming the ids) or skips an example over its limit, never
cuts it. DPO's count is checked against the place where TRL's collator starts cutting; the stages
without truncation are checked on a tiny Qwen2-VL whose context is made shorter than an example."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from alignkit.data.preference import load_preference_dataset
from alignkit.errors import StageInputError
from alignkit.models import load_policy, tiny_model
from alignkit.models.inputs import placeholder_ids
from alignkit.models.lengths import Length, image_end, over_limit, preference_lengths, skipped_summary
from alignkit.records import Prompt, Sample
from alignkit.train.config import SftConfig, TrainConfig

QUESTION = "What shape is it?"


def _image(path: Path, color: str, size: int = 112) -> str:
    img = Image.new("RGB", (size, size), color)
    img.paste((255, 255, 255), (0, 0, size // 3, size // 3))
    img.save(path)
    return str(path)


def _pairs(tmp_path: Path, sizes: dict[str, int]) -> Path:
    """One pair per id, its image `sizes[id]` pixels square (Qwen2-VL: more pixels, more image tokens)."""
    rows = [
        {"pair_id": pid, "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
         "chosen": [{"role": "assistant", "content": "A red square."}],
         "rejected": [{"role": "assistant", "content": "A blue circle and a green triangle."}],
         "images": [_image(tmp_path / f"{pid}.png", "red", size)], "margin": 1.0}
        for pid, size in sizes.items()
    ]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _lengths(model_dir: str, pairs: Path) -> dict[str, Length]:
    model, processor = load_policy(model_dir, dtype=torch.float32)
    ds = load_preference_dataset(pairs, keep={"pair_id": str})
    return {x.id: x for x in preference_lengths(processor, ds, ds["pair_id"], model.config)}


SMALL, LARGE = 56, 224
"""Image sizes of the examples that fit and of those that do not (4 and 64 image tokens in `qwen`)."""


@pytest.fixture
def qwen(tiny_qwen_dir, tmp_path) -> tuple[str, int]:
    """A copy of the tiny Qwen2-VL that takes images up to 224 pixels square (so a larger image has
    many more tokens) and whose context ends just before a LARGE image's prompt does; and that context."""
    from alignkit.models.inputs import encode

    model = tmp_path / "qwen"
    shutil.copytree(tiny_qwen_dir, model)
    processor_config = json.loads((model / "processor_config.json").read_text())
    processor_config["image_processor"]["size"]["longest_edge"] = LARGE * LARGE
    (model / "processor_config.json").write_text(json.dumps(processor_config))
    _, processor = load_policy(str(model), dtype=torch.float32)
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    small, large = (
        len(encode(processor, prompt, [Image.open(_image(tmp_path / f"{s}.png", "red", s))])["input_ids"])
        for s in (SMALL, LARGE)
    )
    assert large - small == 64 - 4
    config = json.loads((model / "config.json").read_text())
    for section in (config, config.get("text_config", {})):
        if "max_position_embeddings" in section:
            section["max_position_embeddings"] = large - 1
    (model / "config.json").write_text(json.dumps(config))
    return str(model), large - 1


# ---------------------------------------------------------------------------------------------
# the rule


def test_image_end_is_just_past_the_last_image_token():
    assert image_end([5, 9, 9, 7, 9, 3], {9}) == 5
    assert image_end([5, 7, 3], {9}) == 0


def test_over_limit_stops_naming_every_id_or_skips_them():
    lengths = [Length("a", 10, 4), Length("b", 30, 25), Length("c", 31, 0)]
    with pytest.raises(StageInputError) as err:
        over_limit(lengths, 20, "stop", "train.max_length")
    message = str(err.value)
    assert "2 of 3 examples are longer than train.max_length (20 tokens" in message
    assert "b (30 tokens, image tokens end at 25)" in message and "c (31 tokens)" in message
    assert "a (" not in message and "overlong: skip" in message
    with pytest.warns(UserWarning, match="skipped"):
        assert over_limit(lengths, 20, "skip", "train.max_length") == {"b", "c"}
    assert over_limit(lengths, 31, "stop", "x") == set() and over_limit(lengths, None, "stop", "x") == set()
    with pytest.raises(StageInputError, match="nothing is left"):
        over_limit(lengths, 5, "skip", "x")
    assert skipped_summary(["c", "b"]) == {"overlong_skipped": 2, "overlong_ids": ["b", "c"]}


# ---------------------------------------------------------------------------------------------
# DPO / MM-DPO: TRL's collator keeps the first max_length tokens


@pytest.mark.parametrize("family", ["tiny:qwen2-vl", "tiny:llava", "tiny:gemma3"])
def test_pair_length_is_where_trl_starts_cutting(family_models, family, tmp_path):
    """With max_length at the counted length TRL's collator keeps every token; one less and it cuts.
    The count includes the image tokens the processor expanded (at least 4 in each tiny family)."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    model_dir = str(tiny_model(family, cache_dir=family_models))
    pairs = _pairs(tmp_path, {"p0": 112})
    length = _lengths(model_dir, pairs)["p0"]
    model, processor = load_policy(model_dir, dtype=torch.float32)
    row = load_preference_dataset(pairs)[0]

    def collate(max_length: int | None) -> torch.Tensor:
        return DataCollatorForVisionPreference(processor, max_length=max_length)([dict(row)])["input_ids"]

    whole = collate(None)
    assert torch.equal(collate(length.tokens), whole)
    assert collate(length.tokens - 1).shape[1] == length.tokens - 1 < whole.shape[1]
    image_tokens = sum(int(t) in placeholder_ids(model.config) for t in whole[0])
    assert image_tokens >= 4 and length.image_end > image_tokens


def test_dpo_stops_naming_the_pair_whose_image_tokens_would_be_cut(qwen, tmp_path):
    """p1's larger image has more tokens; a max_length inside them stops DPO before training, naming
    p1 alone. Unchecked, TRL's collator would cut p1 there and the forward would fail."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from alignkit.train.dpo import train_dpo

    model_dir, _ = qwen
    pairs = _pairs(tmp_path, {"p0": SMALL, "p1": LARGE})
    lengths = _lengths(model_dir, pairs)
    assert lengths["p1"].image_end > lengths["p0"].tokens  # the larger image: more image tokens
    limit = lengths["p1"].image_end - 2
    with pytest.raises(StageInputError, match=r"1 of 2 examples .* train\.max_length") as err:
        train_dpo(pairs, tmp_path / "run", TrainConfig(max_length=limit, max_steps=1), model=model_dir)
    assert f"p1 ({lengths['p1'].tokens} tokens, image tokens end at {lengths['p1'].image_end})" in str(err.value)
    assert "p0" not in str(err.value) and not (tmp_path / "run" / "adapter").exists()

    model, processor = load_policy(model_dir, dtype=torch.float32)
    row = load_preference_dataset(pairs)[1]
    batch = DataCollatorForVisionPreference(processor, max_length=limit)([dict(row)])
    batch.pop("completion_mask")
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(**batch)


@pytest.mark.slow
def test_mmdpo_skips_overlong_pairs_and_counts_them(qwen, tmp_path):
    """`overlong: skip` trains on the pairs that fit; the skipped id is in overlong.json (the stage
    summary's count) and no reference log-prob is computed for it."""
    from alignkit.train.mmdpo import train_mmdpo

    model_dir, _ = qwen
    pairs = _pairs(tmp_path, {"p0": SMALL, "p1": LARGE, "p2": SMALL})
    limit = _lengths(model_dir, pairs)["p1"].image_end - 2
    cfg = TrainConfig(method="mmdpo", max_length=limit, overlong="skip", max_steps=1, batch_size=2, save_steps=5)
    with pytest.warns(UserWarning, match=r"p1 \("):
        adapter = train_mmdpo(pairs, tmp_path / "run", cfg, model=model_dir)
    assert (adapter / "adapter_config.json").exists()
    assert skipped_summary(tmp_path / "run") == {"overlong_skipped": 1, "overlong_ids": ["p1"]}
    (cache,) = (tmp_path / "run" / "ref_logps").iterdir()
    assert sorted(json.loads(line)["key"].split(":")[0] for line in cache.read_text().splitlines()) == ["p0", "p2"]


# ---------------------------------------------------------------------------------------------
# SFT, PPO and the reward model: no truncation; the limit is the model's context


def test_sft_stops_or_skips_examples_over_the_model_context(qwen, tmp_path):
    from alignkit.train.sft import train_sft

    model, _ = qwen
    rows = [
        {"id": f"e{size}", "images": [Path(_image(tmp_path / f"e{size}.png", "blue", size)).name],
         "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
         "completion": [{"role": "assistant", "content": [{"type": "text", "text": "A blue square."}]}]}
        for size in (SMALL, LARGE)
    ]  # fmt: skip
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SftConfig(data=str(data), max_steps=1, batch_size=1, warmup_steps=0)
    with pytest.raises(StageInputError, match=r"1 of 2 examples .*context.* e224 \(") as err:
        train_sft(data, tmp_path / "run", cfg, model=model)
    assert "e56" not in str(err.value)
    with pytest.warns(UserWarning, match="e224"):
        train_sft(data, tmp_path / "run", cfg.model_copy(update={"overlong": "skip"}), model=model)
    assert skipped_summary(tmp_path / "run") == {"overlong_skipped": 1, "overlong_ids": ["e224"]}


def test_ppo_counts_the_prompt_with_its_image_and_the_answer_budget(qwen, tmp_path):
    """A SMALL image's prompt fits with a few answer tokens but not with a whole context's worth; a
    LARGE image's prompt does not fit with any."""
    from alignkit.sample.templates import load_template
    from alignkit.train.ppo import fitting_prompts

    model_dir, context = qwen
    model, processor = load_policy(model_dir, dtype=torch.float32)
    prompts = [Prompt(f"q{s}", QUESTION, [_image(tmp_path / f"q{s}.png", "green", s)]) for s in (SMALL, LARGE)]
    template = load_template("cot")
    with pytest.warns(UserWarning, match="q224"):
        kept, skipped = fitting_prompts(prompts, processor, model.config, template, 4, "skip")
    assert [p.prompt_id for p in kept] == ["q56"] and skipped == {"q224"}
    with pytest.raises(StageInputError, match=r"q56 \(.*q224 \("):
        fitting_prompts(prompts, processor, model.config, template, context, "stop")


def test_rollouts_fit_the_started_vllm_engine_s_max_model_len(qwen, tmp_path):
    """With vLLM rollouts that alignkit starts, a prompt must also fit `sample.vllm.max_model_len`
    (here below the model's context): one that would exceed it by a token is named (stop), one that
    fits exactly is kept; a server at a `url` keeps its own limit, transformers rollouts have none."""
    from alignkit.models.inputs import encode
    from alignkit.sample import to_request
    from alignkit.sample.templates import load_template
    from alignkit.train.ppo import fitting_prompts, rollout_limit

    model_dir, context = qwen
    model, processor = load_policy(model_dir, dtype=torch.float32)
    prompt = Prompt("q56", QUESTION, [_image(tmp_path / "q56.png", "green", SMALL)])
    template = load_template("cot")
    request = to_request(prompt, template)
    needed = len(encode(processor, request.messages, request.images)["input_ids"]) + 4
    assert needed < context
    kept, _ = fitting_prompts([prompt], processor, model.config, template, 4, "stop", engine_limit=needed)
    assert [p.prompt_id for p in kept] == ["q56"]
    with pytest.raises(StageInputError, match=rf"sample\.vllm\.max_model_len, with sample\.max_new_tokens \({needed - 1} tokens.*q56 \({needed} tokens"):
        fitting_prompts([prompt], processor, model.config, template, 4, "stop", engine_limit=needed - 1)

    options = {"max_model_len": 2048, "dtype": "auto"}
    assert rollout_limit("vllm", None, options) == rollout_limit("vllm_server", None, options) == 2048
    assert rollout_limit("vllm_server", "http://localhost:8000", options) is None
    assert rollout_limit("transformers", None, options) is None


def test_reward_model_training_and_scoring_count_image_tokens(qwen, tmp_path):
    """Training leaves out the pair whose image makes it too long; scoring skips that answer, writes
    a null score for it and null rm_* columns on its pair, and counts it."""
    from alignkit.reward.config import RewardModelConfig
    from alignkit.reward.data import read_rm_pairs
    from alignkit.reward.model import build_reward_model
    from alignkit.reward.score import annotate_pairs_file, score_samples
    from alignkit.reward.train import fitting_pairs

    model_dir, context = qwen
    pairs_path = _pairs(tmp_path, {"p0": SMALL, "p1": LARGE})
    rm = build_reward_model(model_dir, dtype=torch.float32)
    cfg = RewardModelConfig(use_critiques=False, num_critiques=0, overlong="skip")
    with pytest.warns(UserWarning, match="p1"):
        kept, skipped = fitting_pairs(rm, read_rm_pairs(pairs_path), cfg)
    assert [p.pair_id for p in kept] == ["p0"] and skipped == {"p1"}
    with pytest.raises(StageInputError, match=r"p1 \("):
        fitting_pairs(rm, read_rm_pairs(pairs_path), cfg.model_copy(update={"overlong": "stop"}))
    # the held-out evaluation's critiques count too: with room for a context's worth, p0 is too long
    with pytest.raises(StageInputError, match=r"2 of 2 examples .*p0 \("):
        fitting_pairs(rm, read_rm_pairs(pairs_path), cfg.model_copy(update={"overlong": "stop", "num_critiques": 1,
                                                                          "max_critique_tokens": context}))  # fmt: skip

    rm.save(tmp_path / "rm")
    prompts = [Prompt(p, QUESTION, [str(tmp_path / f"{p}.png")]) for p in ("p0", "p1")]
    samples = [Sample(f"{p}#s{i}", p, "A red square.", "", "square", True, 3, "stop") for p in ("p0", "p1") for i in (0, 1)]
    out = tmp_path / "rm_scores.jsonl"
    with pytest.warns(UserWarning, match="p1#s0"):
        summary = score_samples(tmp_path / "rm", prompts, samples, {p.prompt_id: QUESTION for p in prompts}, out,
                                overlong="skip", num_critiques=0)  # fmt: skip
    scores = {r["sample_id"]: r["rm_score"] for r in map(json.loads, out.read_text().splitlines())}
    assert summary["num_scored"] == 2 and summary["overlong_ids"] == ["p1#s0", "p1#s1"]
    assert scores["p1#s0"] is None and isinstance(scores["p0#s0"], float)

    lines = [json.loads(line) for line in pairs_path.read_text().splitlines()]
    for line in lines:
        line.update(chosen_id=f"{line['pair_id']}#s0", rejected_id=f"{line['pair_id']}#s1", prompt_id=line["pair_id"])
    pairs_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    accuracy = annotate_pairs_file(pairs_path, out)
    annotated = {p["pair_id"]: p for p in map(json.loads, pairs_path.read_text().splitlines())}
    assert annotated["p1"]["rm_margin"] is None and isinstance(annotated["p0"]["rm_margin"], float)
    assert accuracy["num_pairs"] == 1


@pytest.mark.slow
def test_train_stage_summary_counts_the_skipped_pairs(qwen, tmp_path):
    """Through the runner: `train.overlong: skip` trains, and stages.json counts the skipped pair."""
    from alignkit.recipe import Recipe
    from alignkit.runner import Runner

    model_dir, _ = qwen
    pairs = _pairs(tmp_path, {"p0": SMALL, "p1": LARGE})
    limit = _lengths(model_dir, pairs)["p1"].image_end - 2
    recipe = Recipe.model_validate({
        "output_dir": str(tmp_path / "run"), "stages": ["pairs", "train"], "policy": {"model": model_dir},
        "data": {"pairs": str(pairs)},
        "train": {"max_length": limit, "overlong": "skip", "max_steps": 1, "batch_size": 1},
    })  # fmt: skip
    with pytest.warns(UserWarning, match="1 of 2 examples"):
        summary = Runner(recipe).run()["train"]
    assert summary["overlong_skipped"] == 1 and len(summary["overlong_ids"]) == 1
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert json.dumps(summary["overlong_ids"]) in json.dumps(stages)


def test_grpo_leaves_out_the_prompt_whose_image_overruns_the_context(qwen, tmp_path):
    """GRPO and RLOO check their prompts as PPO does: under `skip` the LARGE image's prompt never
    reaches TRL's dataset and its id is recorded for the stage summary."""
    from alignkit.sample.config import SampleConfig
    from alignkit.train.config import GrpoConfig, TrainConfig
    from alignkit.train.grpo import grpo_trainer

    model_dir, _ = qwen
    prompts = [Prompt(f"q{s}", QUESTION, [_image(tmp_path / f"q{s}.png", "green", s)]) for s in (SMALL, LARGE)]
    train = TrainConfig(method="grpo", overlong="skip")
    with pytest.warns(UserWarning, match="q224"):
        trainer, _ = grpo_trainer(prompts, tmp_path / "run", GrpoConfig(steps=1, prompts_per_step=1), model=model_dir,
                                  reward=None, sample=SampleConfig(num_samples=2, max_new_tokens=4), train=train)  # fmt: skip
    assert trainer.train_dataset["prompt_id"] == ["q56"]
    assert skipped_summary(tmp_path / "run") == {"overlong_skipped": 1, "overlong_ids": ["q224"]}
