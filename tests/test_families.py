"""The model-family matrix: every tiny family x the stages that run in-process (transformers
sampling, SFT, DPO, MM-DPO, PPO, reward-model scoring), and an image-ablation check per family (the
policy's, the reward model's and PPO's value model's outputs change when only the image changes,
so a path that drops the image fails). Prompts with two images go through every stage for the
families in SEVERAL. `benchmarks/families_table.py` turns this file's results into docs/families.md.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from alignkit.errors import ModelError
from alignkit.models import BUILDERS, load_policy, lora_config, tiny_model
from alignkit.models.inputs import collate, encode, placeholder_ids
from alignkit.records import Prompt

FAMILIES = sorted(BUILDERS)
# Families whose stages are also run on prompts with two images: Qwen2-VL, and the two whose
# processors have per-image outputs or batch-shaped image lists (LLaVA-OneVision, Gemma 3).
SEVERAL = ["tiny:gemma3", "tiny:llava-onevision", "tiny:qwen2-vl"]
PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]}]
ANSWER = [{"role": "assistant", "content": [{"type": "text", "text": "I see a red square. Answer: square"}]}]


def _image(color: str, size: tuple[int, int] = (112, 112)) -> Image.Image:
    """A plain square of `color` with a white corner, so images differ in more than one value."""
    img = Image.new("RGB", size, color)
    img.paste((255, 255, 255), (0, 0, size[0] // 3, size[1] // 3))
    return img


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """One cache of tiny models for the module (each family is built on first use)."""
    return tmp_path_factory.mktemp("families")


def _dir(models: Path, family: str) -> str:
    return str(tiny_model(family, cache_dir=models))


def _prompt(images: int) -> list[dict]:
    """PROMPT with `images` image placeholders before its question."""
    return [{"role": "user", "content": [{"type": "image"}] * images + PROMPT[0]["content"][1:]}]


def _completion_logps(model, processor, *images: Image.Image) -> torch.Tensor:
    """Log-probs of ANSWER's tokens after PROMPT (one image placeholder per image), from one forward pass."""
    features = encode(processor, _prompt(len(images)), list(images), ANSWER)
    batch = collate([features], processor.tokenizer.pad_token_id)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    picked = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return picked[keep]


PROCESSORS = {
    "tiny:qwen2-vl": "Qwen2VLProcessor", "tiny:qwen2.5-vl": "Qwen2_5_VLProcessor", "tiny:qwen3-vl": "Qwen3VLProcessor",
    "tiny:llava": "LlavaProcessor", "tiny:llava-onevision": "LlavaOnevisionProcessor", "tiny:idefics3": "Idefics3Processor",
    "tiny:gemma3": "Gemma3Processor", "tiny:internvl": "InternVLProcessor", "tiny:mistral3": "PixtralProcessor",
    "tiny:smolvlm": "SmolVLMProcessor",
}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_build_has_the_family_processor_and_ids_in_the_vocabulary(models, family):
    """Saved processor class, two eos ids and the pad id inside the vocabulary, and a chat template
    that keeps a system message's text (Gemma 3 has no system role: it opens the user turn)."""
    from transformers import AutoProcessor, GenerationConfig

    path = _dir(models, family)
    processor, generation = AutoProcessor.from_pretrained(path), GenerationConfig.from_pretrained(path)
    assert type(processor).__name__ == PROCESSORS[family]
    vocab = len(processor.tokenizer)
    assert len(set(generation.eos_token_id)) == 2 and all(0 <= i < vocab for i in generation.eos_token_id)
    assert 0 <= generation.pad_token_id < vocab and processor.tokenizer.pad_token_id == generation.pad_token_id
    system = [{"role": "system", "content": "Be brief."}, *PROMPT]
    text = processor.apply_chat_template(system, tokenize=False, add_generation_prompt=True)
    assert "Be brief." in text and "What shape is it?" in text
    if family == "tiny:gemma3":
        assert text.index("<start_of_turn>user\nBe brief.") < text.index("What shape is it?")


@pytest.mark.parametrize("family", FAMILIES)
def test_image_reaches_the_policy(models, family):
    """The forward log-probs of a fixed answer change when only the image changes."""
    model, processor = load_policy(_dir(models, family), dtype=torch.float32)
    red, blue = (_completion_logps(model.eval(), processor, _image(c)) for c in ("red", "blue"))
    assert red.shape == blue.shape and red.numel() > 3
    assert torch.isfinite(red).all()
    assert (red - blue).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_second_image_reaches_the_policy(models, family):
    """Two images in one prompt: changing only the second changes the answer's log-probs."""
    model, processor = load_policy(_dir(models, family), dtype=torch.float32)
    red, blue = (_completion_logps(model.eval(), processor, _image("green"), _image(c)) for c in ("red", "blue"))
    assert red.shape == blue.shape and (red - blue).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_only_the_language_model(models, family):
    """The default LoRA targets exist in each family and all sit inside its language model."""
    from peft import get_peft_model

    model, _ = load_policy(_dir(models, family), dtype=torch.float32)
    adapted = [
        n for n, _ in get_peft_model(model, lora_config(4, 8, model=model)).named_modules() if n.endswith(".lora_A")
    ]
    assert len(adapted) == 7 * 2  # q, k, v, o, gate, up, down in each of the 2 text layers
    assert all(".language_model." in n or ".text_model." in n for n in adapted)


def test_lora_targets_that_match_nothing_name_the_model(models):
    model, _ = load_policy(_dir(models, "tiny:gemma3"), dtype=torch.float32)
    with pytest.raises(ModelError, match=r"match no module of .*Gemma3ForConditionalGeneration.*q_proj"):
        lora_config(4, 8, target_modules=["wq", "wk"], model=model)


@pytest.mark.parametrize("family", FAMILIES)
def test_placeholder_ids_are_the_tokens_the_model_fills(models, family):
    """The encoded prompt holds one placeholder per image feature the model writes in (Gemma 3: the
    soft tokens, not `<start_of_image>`); features of any other count would fail the forward."""
    from transformers import AutoConfig

    path = _dir(models, family)
    _, processor = load_policy(path, dtype=torch.float32)
    ids = placeholder_ids(AutoConfig.from_pretrained(path))
    input_ids = encode(processor, PROMPT, [_image("red")])["input_ids"].tolist()
    image_id = next(iter(ids & set(input_ids)))
    assert len(ids & set(input_ids)) == 1 and input_ids.count(image_id) >= 4
    if family == "tiny:gemma3":
        assert processor.tokenizer.convert_ids_to_tokens(image_id) == "<image_soft_token>" != processor.image_token


def test_collate_passes_per_image_outputs_through(models):
    """LLaVA-OneVision's `batch_num_images` and `image_sizes` are per image, not per token: a batch
    of two examples of different lengths keeps one entry per image, while the tokens are padded."""
    _, processor = load_policy(_dir(models, "tiny:llava-onevision"), dtype=torch.float32)
    short = [{"role": "assistant", "content": [{"type": "text", "text": "A square."}]}]
    features = [encode(processor, PROMPT, [_image("red")], ANSWER), encode(processor, PROMPT, [_image("blue")], short)]
    assert features[0]["batch_num_images"].tolist() == [1] and features[0]["image_sizes"].shape == (1, 2)
    lengths = [len(f["input_ids"]) for f in features]
    batch = collate(features, processor.tokenizer.pad_token_id)
    assert lengths[0] > lengths[1] and batch["input_ids"].shape == (2, lengths[0])
    assert batch["batch_num_images"].tolist() == [1, 1] and batch["image_sizes"].shape == (2, 2)
    assert batch["pixel_values"].shape[0] == 2


# Stage cases: every family with one image per prompt (id `tiny:x`), and the SEVERAL families with
# two (id `tiny:x+2img`, the second image the one that changes in the image-ablation checks).
CASES = [pytest.param(f, 1, id=f) for f in FAMILIES] + [pytest.param(f, 2, id=f"{f}+2img") for f in SEVERAL]


@pytest.mark.parametrize(("family", "images"), CASES)
def test_sample_with_transformers(models, family, images):
    """Two prompts with images of different sizes in one batch: each prompt gets its own image list."""
    from alignkit.sample.base import Request
    from alignkit.sample.transformers_backend import TransformersBackend

    backend = TransformersBackend(_dir(models, family), max_new_tokens=8, batch_size=2, dtype="float32")
    firsts = [_image("green", (128, 96))] * (images - 1)
    requests = [Request("a", _prompt(images), [*firsts, _image("red")]),
                Request("b", _prompt(images), [*firsts, _image("blue", (96, 128))])]  # fmt: skip
    first = backend.generate(requests, num_samples=2, seed=1)
    assert [len(g) for g in first] == [2, 2]
    assert all(1 <= g.num_tokens <= 8 and len(g.token_ids) == g.num_tokens for gs in first for g in gs)
    again = backend.generate(requests, num_samples=2, seed=1)
    assert [[g.token_ids for g in gs] for gs in again] == [[g.token_ids for g in gs] for gs in first]


@pytest.mark.parametrize(("family", "images"), CASES)
def test_reward_model_scores_see_the_image(models, family, images):
    """A fresh LoRA reward model scores answers (with and without a critique first), and the score
    moves with the (last) image."""
    from alignkit.reward.model import build_reward_model
    from alignkit.reward.score import Answer, score_answers

    torch.manual_seed(0)
    rm = build_reward_model(_dir(models, family), finetune="lora", dtype=torch.float32)
    firsts = [_image("green")] * (images - 1)
    answers = [Answer(_prompt(images), ANSWER, [*firsts, _image(c)]) for c in ("red", "blue")]
    red, blue = (s.score for s in score_answers(rm, answers, num_critiques=0, batch_size=2))
    assert all(map(lambda x: x == x and abs(x) < 1e6, (red, blue)))
    assert abs(red - blue) > 1e-6
    critiqued = score_answers(rm, answers, num_critiques=1, max_new_tokens=8, batch_size=2)
    assert all(len(s.critiques) == 1 and isinstance(s.critiques[0], str) and s.score == s.score for s in critiqued)
    assert abs(critiqued[0].score - critiqued[1].score) > 1e-6  # the critiqued answer's forward sees the image too


def _shapes_prompts(tmp_path: Path, n: int, images: int = 1) -> list[Prompt]:
    """`n` shapes-world prompts; each shows its own image and then the next `images` - 1 prompts' images."""
    from alignkit.worlds.shapes import make_shapes_prompts

    prompts = make_shapes_prompts(tmp_path, n + images - 1, seed=3)
    return [replace(p, images=[q.images[0] for q in prompts[i : i + images]]) for i, p in enumerate(prompts[:n])]


def _shapes_rows(tmp_path: Path, n: int, images: int = 1) -> list[dict]:
    from alignkit.sample.templates import load_template
    from alignkit.worlds.shapes import sft_examples

    return sft_examples(_shapes_prompts(tmp_path, n, images), load_template("cot"), 0.5, seed=3)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "images"), CASES)
def test_sft_two_steps(models, family, images, tmp_path):
    from alignkit.records import write_jsonl
    from alignkit.train.config import SftConfig
    from alignkit.train.sft import train_sft

    rows = _shapes_rows(tmp_path, 2, images)
    assert all(len(r["images"]) == images for r in rows)
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg = SftConfig(data=str(data), finetune="lora", max_steps=2, batch_size=2, warmup_steps=0)
    train_sft(data, tmp_path / "run", cfg, model=_dir(models, family), logging_steps=1)
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2] and all(r["loss"] == r["loss"] for r in logs)


def _pairs_file(tmp_path: Path, images: int = 1) -> Path:
    """Two preference pairs (shapes-world prompts; the other example's answer is rejected), each
    with a rationale per answer (the reward model's critiques)."""
    rows = _shapes_rows(tmp_path, 4, images)
    pairs = [
        {"pair_id": f"p{i}", "prompt_id": f"q{i}", "prompt": a["prompt"], "chosen": a["completion"],
         "rejected": b["completion"], "images": a["images"], "margin": 0.5 + i,
         "chosen_rationale": "Every shape named is in the image.", "rejected_rationale": "It names a shape not shown."}
        for i, (a, b) in enumerate(zip(rows[::2], rows[1::2]))
    ]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("family", "images"), CASES)
def test_dpo_two_steps(models, family, images, tmp_path):
    from alignkit.train.config import TrainConfig
    from alignkit.train.dpo import train_dpo

    cfg = TrainConfig(max_steps=2, batch_size=1, save_steps=2, learning_rate=1e-3)
    adapter = train_dpo(_pairs_file(tmp_path, images), tmp_path / "run", cfg, model=_dir(models, family))
    assert (Path(adapter) / "adapter_config.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("family", "images"), CASES)
def test_mmdpo_two_steps(models, family, images, tmp_path):
    """MM-DPO: the reference log-probs are computed once per pair (with the images) and cached."""
    from alignkit.train.config import TrainConfig
    from alignkit.train.mmdpo import train_mmdpo

    cfg = TrainConfig(method="mmdpo", max_steps=2, batch_size=1, save_steps=2, learning_rate=1e-3)
    adapter = train_mmdpo(_pairs_file(tmp_path, images), tmp_path / "run", cfg, model=_dir(models, family))
    assert (Path(adapter) / "adapter_config.json").exists()
    assert any((tmp_path / "run" / "ref_logps").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize(("family", "images"), CASES)
def test_ppo_two_steps(models, family, images, tmp_path):
    """Two PPO steps (transformers rollouts, LoRA, the reference judge's reward): both logged with
    finite losses, no KL at the first rollout (the policy is the reference), and an adapter whose
    LoRA B matrices moved off their zero start."""
    from safetensors.torch import load_file

    from alignkit.judge.config import JudgeConfig
    from alignkit.sample.config import SampleConfig
    from alignkit.train.config import PpoConfig, TrainConfig
    from alignkit.train.ppo import train_ppo
    from alignkit.train.rewards import judge_reward

    prompts = _shapes_prompts(tmp_path, 2, images)
    reward = judge_reward(JudgeConfig(rubric="overall", backend="reference"), tmp_path / "verdicts.sqlite")
    cfg = PpoConfig(steps=2, prompts_per_step=2, ppo_epochs=1, num_minibatches=2)
    sample = SampleConfig(template="plain", num_samples=2, max_new_tokens=6, batch_size=2)
    train = TrainConfig(method="ppo", learning_rate=1e-2, save_steps=100)
    adapter = train_ppo(prompts, tmp_path / "run", cfg, model=_dir(models, family), reward=reward, sample=sample,
                        train=train)  # fmt: skip
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r["policy_loss"], r["value_loss"], r["kl"]])).all() for r in logs)
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    lora_b = [v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)


@pytest.mark.parametrize(("family", "images"), CASES)
def test_ppo_value_model_sees_the_image(models, family, images, tmp_path):
    """PPO's value estimates of the same answer tokens change when only the (last) image changes:
    the shared value head (on the policy's hidden states) and a separate critic backbone."""
    from torch import nn

    from alignkit.sample.base import Generation
    from alignkit.sample.templates import load_template
    from alignkit.train.ppo import ValueHead, collect, evaluate

    path = _dir(models, family)
    policy, processor = load_policy(path, dtype=torch.float32)
    critic, _ = load_policy(path, dtype=torch.float32)
    torch.manual_seed(0)
    hidden = policy.config.get_text_config().hidden_size
    heads = [ValueHead(hidden), ValueHead(hidden, critic)]
    for head in heads:
        nn.init.normal_(head.head.weight)  # a value head starts at zero: nothing to compare yet
    answer = processor.tokenizer("I see a red square.", add_special_tokens=False)["input_ids"]
    pad = processor.tokenizer.pad_token_id

    class FixedAnswer:  # a rollout engine that always "samples" `answer`
        group = None

        def generate(self, requests, k, seed):
            return [[Generation("", len(answer), "stop", answer)] * k for _ in requests]

    def values(color: str) -> torch.Tensor:
        files = []
        for i, c in enumerate(["green"] * (images - 1) + [color]):
            _image(c).save(tmp_path / f"{i}-{c}.png")
            files.append(str(tmp_path / f"{i}-{c}.png"))
        batch = collect(
            FixedAnswer(), processor, [Prompt("p", "What shape is it?", files)], load_template("plain"), 1, 0
        )
        assert batch.targets[0].tolist() == answer
        with torch.no_grad():
            return torch.stack(
                [evaluate(policy.eval(), head.eval(), batch, torch.arange(1), pad, 1.0)[2] for head in heads]
            )

    red, blue = values("red"), values("blue")
    assert red.shape == (2, 1, len(answer)) and torch.isfinite(red).all()
    assert ((red - blue).abs().flatten(1).amax(1) > 1e-4).all()  # both value models


@pytest.mark.slow
@pytest.mark.parametrize(("family", "images"), CASES)
def test_reward_model_trains(models, family, images, tmp_path):
    """One step of critique reward-model training (Bradley-Terry + critique loss) on two pairs, then the
    saved model scores both answers of a pair."""
    from alignkit.reward.config import RewardModelConfig
    from alignkit.reward.data import read_rm_pairs
    from alignkit.reward.model import load_reward_model
    from alignkit.reward.score import pair_answers, score_answers
    from alignkit.reward.train import train_reward_model

    pairs = _pairs_file(tmp_path, images)
    cfg = RewardModelConfig(max_steps=1, batch_size=2, eval_fraction=0.0, learning_rate=1e-3)
    summary = train_reward_model(pairs, tmp_path / "rm", cfg, model=_dir(models, family))
    logs = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert summary["train_pairs"] == 2 and [r["step"] for r in logs] == [1]
    assert logs[0]["bradley_terry"] > 0 and logs[0]["critique_ce"] > 0  # the rationales were trained on as critiques
    rm = load_reward_model(summary["model"], dtype=torch.float32)
    scored = score_answers(rm, pair_answers(read_rm_pairs(pairs)[:1]), num_critiques=0, batch_size=2)
    assert len(scored) == 2 and all(s.score == s.score for s in scored)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "images"), CASES)
def test_eval_answers_and_scores(models, family, images, tmp_path):
    """The eval stage's function: one greedy answer per held-out prompt (transformers), scored."""
    from alignkit.evaluate import run_eval
    from alignkit.evaluate.config import EvalConfig
    from alignkit.records import Sample as SampleRecord
    from alignkit.records import read_records

    prompts = _shapes_prompts(tmp_path, 3, images)
    # The section needs a prompt source; run_eval answers the prompts it is handed.
    cfg = EvalConfig(synthetic={"num_prompts": 3}, max_new_tokens=6, batch_size=2)
    results = run_eval(prompts, tmp_path / "eval", cfg, fingerprint="f", model=_dir(models, family), template="plain")
    answers = read_records(tmp_path / "eval" / "answers.jsonl", SampleRecord)
    assert sorted(a.prompt_id for a in answers) == sorted(p.prompt_id for p in prompts)
    assert results["failed_prompts"] == [] and results["num_prompts"] == 3
    assert sum(len(rows) for rows in results["outcomes"].values()) + sum(results.get("unscored", {}).values()) == 3


@pytest.mark.slow
@pytest.mark.parametrize("family", ["tiny:llava-onevision", "tiny:qwen2.5-vl"])
def test_vllm_lora_checks_the_architecture(models, family, tmp_path):
    """vLLM has no LoRA for LLaVA-OneVision, so the vLLM backend must sample from a merged copy;
    a Qwen2.5-VL language-model adapter is applied as LoRA."""
    pytest.importorskip("vllm")
    from peft import get_peft_model

    from alignkit.sample.vllm_backend import lora_problem

    model, _ = load_policy(_dir(models, family), dtype=torch.float32)
    get_peft_model(model, lora_config(4, 8, model=model)).save_pretrained(tmp_path / "adapter")
    problem = lora_problem(str(tmp_path / "adapter"), _dir(models, family))
    assert lora_problem(str(tmp_path / "adapter")) == problem  # the adapter's own base model, as PPO calls it
    if family == "tiny:llava-onevision":
        assert problem == "vLLM has no LoRA support for the LlavaOnevisionForConditionalGeneration architecture"
    else:
        assert problem is None


@pytest.mark.parametrize("family", ["tiny:llava", "tiny:gemma3"])
def test_merged_copy_has_hub_vision_names_and_reloads(models, family, tmp_path):
    """merge_adapter writes a CLIP/SigLIP tower under the hub names vLLM reads; transformers reloads
    it with the same weights (the vision tower is untouched by a language-model LoRA)."""
    from peft import get_peft_model
    from safetensors import safe_open

    from alignkit.models import merge_adapter

    path = _dir(models, family)
    model, _ = load_policy(path, dtype=torch.float32)
    get_peft_model(model, lora_config(4, 8, model=model)).save_pretrained(tmp_path / "adapter")
    merged = merge_adapter(path, str(tmp_path / "adapter"), tmp_path / "merged")
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        tower = [k for k in f.keys() if k.startswith("vision_tower.")]
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    original, _ = load_policy(path, dtype=torch.float32)
    reloaded, _ = load_policy(str(merged), dtype=torch.float32)
    before, after = original.model.vision_tower.state_dict(), reloaded.model.vision_tower.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_quickstart_runs_on_a_local_family_directory(models, family, tmp_path):
    """recipes/quickstart.yaml with policy.model changed to a family's directory, through the
    `alignkit` command: every stage of it (SFT, sample, judge, pairs, MM-DPO, eval before and after,
    report). Only the sizes are cut (SFT steps, prompts) to fit CI."""
    import subprocess
    import sys

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    keys = [f"policy.model={_dir(models, family)}", f"output_dir={tmp_path / 'run'}",
            "sft.max_steps=4", "sft.synthetic.num_examples=32", "data.synthetic.num_prompts=8",
            "eval.synthetic.num_prompts=8"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "alignkit", "run", str(recipe), *keys],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    samples = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 8 * 8
    assert (tmp_path / "run" / "train" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "run" / "eval" / "comparison.txt").exists()
    assert (tmp_path / "run" / "report.html").exists()


@pytest.mark.slow
def test_two_image_prompts_through_a_recipe(models, tmp_path):
    """A prompts file whose prompts show two images each, through the runner's stages on the tiny
    Gemma 3 (its processor takes a batch's images as one list per prompt): transformers sampling,
    reference judge, pairs, reward model train + score, DPO, eval before and after. The records
    keep both images, and the pairs' prompts hold two image placeholders."""
    from alignkit.recipe import Recipe
    from alignkit.runner import Runner
    from alignkit.worlds.shapes import write_prompts

    prompts = write_prompts(_shapes_prompts(tmp_path, 6, images=2), tmp_path / "prompts.jsonl")
    recipe = Recipe.model_validate({
        "output_dir": str(tmp_path / "run"), "policy": {"model": _dir(models, "tiny:gemma3")},
        "stages": ["prompts", "sample", "judge", "pairs", "reward_model", "score", "train", "eval"],
        "data": {"prompts": str(prompts), "allow_outside_paths": True},
        "sample": {"backend": "transformers", "num_samples": 4, "max_new_tokens": 24, "template": "plain"},
        "judge": {"backend": "reference", "rubric": "overall"},
        "reward_model": {"max_steps": 1, "batch_size": 2, "eval_fraction": 0.0, "num_critiques": 0},
        "train": {"method": "dpo", "max_steps": 2, "batch_size": 1, "save_steps": 2},
        "eval": {"prompts": str(prompts), "allow_outside_paths": True, "max_new_tokens": 8, "judge": False},
    })  # fmt: skip
    runner = Runner(recipe)
    runner.run()
    paths = runner.paths
    assert all(len(json.loads(line)["images"]) == 2 for line in paths.prompts.read_text().splitlines())
    pairs = [json.loads(line) for line in paths.pairs.read_text().splitlines()]
    assert pairs and all(len(p["images"]) == 2 for p in pairs)
    assert all(sum(c.get("type") == "image" for c in p["prompt"][0]["content"]) == 2 for p in pairs)
    assert all(p["rm_chosen_score"] == p["rm_chosen_score"] and "rm_margin" in p for p in pairs)  # the score stage
    assert (paths.adapter / "adapter_config.json").is_file()
    for label in ("base", "round-1"):
        assert json.loads((paths.eval / label / "results.json").read_text())["num_prompts"] == 6
