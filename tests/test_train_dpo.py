"""DPO training stage: the pairs loader (fast) and LoRA-DPO runs on tiny offline VLMs (slow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from alignkit.data.preference import load_preference_dataset
from alignkit.records import RecordError
from alignkit.train.config import TrainConfig
from alignkit.train.dpo import train_dpo

COLORS = ["red", "blue", "green", "yellow"]


def _pair(i: int, image: Path, prompt_content=None) -> dict:
    color = COLORS[i % len(COLORS)]
    content = prompt_content or [{"type": "image"}, {"type": "text", "text": "Describe the image."}]
    return {
        "pair_id": f"p{i}",
        "prompt_id": f"q{i}",
        "prompt": [{"role": "user", "content": content}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"There is a {color} square."}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "There is a purple triangle."}]}],
        "images": [str(image)],
        "margin": 0.5,
        "chosen_score": 0.9,
        "rejected_score": 0.4,
        "chosen_rationale": "matches",
        "rejected_rationale": "hallucinated",
        "chosen_id": f"q{i}#s0",
        "rejected_id": f"q{i}#s1",
    }


def _write_pairs(dir: Path, n: int = 4) -> Path:
    lines = []
    for i in range(n):
        image = dir / f"img{i}.png"
        Image.new("RGB", (112, 112), COLORS[i % len(COLORS)]).save(image)
        lines.append(json.dumps(_pair(i, image)) + "\n")
    path = dir / "pairs.jsonl"
    path.write_text("".join(lines))
    return path


# ---------------------------------------------------------------------------------------------
# pairs loader


def test_loader_keeps_trl_columns_and_decodes_images(tmp_path):
    ds = load_preference_dataset(_write_pairs(tmp_path, n=2))
    assert sorted(ds.column_names) == ["chosen", "images", "prompt", "rejected"]
    row = ds[0]
    assert isinstance(row["images"][0], Image.Image) and row["images"][0].mode == "RGB"
    assert [p["type"] for p in row["prompt"][0]["content"]] == ["image", "text"]
    assert row["chosen"][0]["content"][0]["text"] == "There is a red square."


def test_loader_inserts_image_placeholders_for_string_prompt(tmp_path):
    image = tmp_path / "img.png"
    Image.new("RGB", (112, 112), "red").save(image)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(_pair(0, image, prompt_content="Describe the image.")) + "\n")
    content = load_preference_dataset(path)[0]["prompt"][0]["content"]
    assert [p["type"] for p in content] == ["image", "text"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "pairs.jsonl:2: not valid JSON"),
        (json.dumps({"prompt": []}), "pairs.jsonl:2: missing key(s)"),
        ("IMAGES_MISMATCH", "pairs.jsonl:2: the prompt has 1 image placeholder(s) for 2 image(s)"),
        ("MISSING_IMAGE", "pairs.jsonl:2: image file not found"),
    ],
)
def test_loader_errors_name_file_and_line(tmp_path, line, message):
    image = tmp_path / "img.png"
    Image.new("RGB", (112, 112), "red").save(image)
    good = _pair(0, image)
    if line == "IMAGES_MISMATCH":
        line = json.dumps({**good, "images": [str(image), str(image)]})
    elif line == "MISSING_IMAGE":
        line = json.dumps({**good, "images": [str(tmp_path / "nope.png")]})
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(RecordError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_preference_dataset(path)


def test_loader_rejects_empty_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n")
    with pytest.raises(RecordError, match="pairs.jsonl: no preference pairs"):
        load_preference_dataset(path)


# ---------------------------------------------------------------------------------------------
# training on tiny models


def _adapter_tensors(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


def _global_step(run: Path) -> int:
    checkpoints = sorted(run.glob("checkpoints/checkpoint-*"), key=lambda d: int(d.name.split("-")[-1]))
    return json.loads((checkpoints[-1] / "trainer_state.json").read_text())["global_step"]


@pytest.mark.slow
def test_train_dpo_qwen2_vl_trains_saves_and_resumes(tmp_path, tiny_qwen_dir, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOTrainer

    pairs, run = _write_pairs(tmp_path), tmp_path / "run"
    adapter = train_dpo(pairs, run, TrainConfig(max_steps=2, save_steps=1, learning_rate=1e-3), model=str(tiny_qwen_dir))

    # a PEFT adapter directory with the processor beside it, on the language model only
    assert adapter == run / "adapter" and (adapter / "adapter_config.json").exists()
    assert not (run / "adapter.tmp").exists()
    weights = _adapter_tensors(adapter)
    assert weights and not any(".visual." in k for k in weights)
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # lora_B starts at zero

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all("loss" in m and "rewards/accuracies" in m and "rewards/margins" in m for m in metrics)

    # the adapter loads on the base model and generates
    base = AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir)
    policy = PeftModel.from_pretrained(base, adapter).eval()
    processor = AutoProcessor.from_pretrained(adapter)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (112, 112), "red")], return_tensors="pt")
    out = policy.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]

    # a kill: the final adapter is gone, a checkpoint was cut mid-save, a step was logged after
    # the last checkpoint; the re-run resumes from checkpoint-2 and runs only the 2 new steps
    shutil.rmtree(adapter)
    (run / "checkpoints" / "checkpoint-3").mkdir()
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "loss": 9.9}) + "\n")
    steps_run = []
    original = DPOTrainer.training_step

    def counted(self, *args, **kwargs):
        steps_run.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DPOTrainer, "training_step", counted)

    train_dpo(pairs, run, TrainConfig(max_steps=4, save_steps=1, learning_rate=1e-3), model=str(tiny_qwen_dir))
    assert steps_run == [2, 3] and _global_step(run) == 4
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2, 3, 4] and steps[:2] == metrics
    assert (run / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
def test_train_dpo_tiny_llava_one_step(tmp_path):
    from alignkit.models import build_tiny_llava

    llava = build_tiny_llava(tmp_path / "tiny-llava")
    adapter = train_dpo(_write_pairs(tmp_path, n=2), tmp_path / "run", TrainConfig(max_steps=1), model=str(llava))
    weights = _adapter_tensors(adapter)
    # LLaVA's CLIP tower also has q_proj/k_proj/v_proj: the default targets must skip it
    assert weights and all(".language_model." in k for k in weights)
