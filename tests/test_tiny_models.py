import json
import re
from pathlib import Path

import pytest

from alignkit.errors import ModelError
from alignkit.models import build_tiny_llava, build_tiny_qwen2_vl, resolve_model, tiny, tiny_model
from alignkit.records import load_image
from alignkit.worlds.shapes import make_shapes_prompts


def _chat(question: str):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _generate(model_dir: Path, tmp_path: Path, image_token_id: int, image_tokens: int):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    prompts = make_shapes_prompts(tmp_path, 2)
    texts = [processor.apply_chat_template(_chat(p.question), add_generation_prompt=True) for p in prompts]
    assert texts[0].endswith("<|im_start|>assistant\n")
    images = [load_image(p.images[0]) for p in prompts]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    assert (inputs["input_ids"][0] == image_token_id).sum() == image_tokens
    out = model.generate(**inputs, max_new_tokens=4, do_sample=True, num_return_sequences=2)
    assert out.shape == (4, inputs["input_ids"].shape[1] + 4)
    return processor, model


def test_tiny_qwen2_vl_loads_and_generates(tiny_qwen_dir: Path, tmp_path: Path):
    config = json.loads((tiny_qwen_dir / "config.json").read_text())
    processor, model = _generate(tiny_qwen_dir, tmp_path, config["image_token_id"], 16)
    tok = processor.tokenizer
    for key, token in [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]:  # fmt: skip
        assert config[key] == tok.convert_tokens_to_ids(token)
    assert model.generation_config.eos_token_id[0] == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id < len(tok)
    # Shapes-world text tokenizes compactly with the trained BPE.
    assert len(tok("There is a red square and a blue circle.")["input_ids"]) <= 12


def test_tiny_qwen2_vl_is_deterministic(tiny_qwen_dir: Path, tmp_path: Path):
    other = build_tiny_qwen2_vl(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (other / name).read_bytes() == (tiny_qwen_dir / name).read_bytes()


def test_tiny_llava_loads_and_generates(tmp_path: Path):
    model_dir = build_tiny_llava(tmp_path / "llava")
    config = json.loads((model_dir / "config.json").read_text())
    _generate(model_dir, tmp_path, config["image_token_index"], 64)


def test_tiny_model_builds_once_into_the_cache(tmp_path: Path, monkeypatch):
    calls = []

    def fake_build(out_dir: Path, seed: int = 0) -> Path:
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setitem(tiny.BUILDERS, "tiny:qwen2-vl", fake_build)
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    first = tiny_model("tiny:qwen2-vl")
    assert first == tmp_path / f"tiny-qwen2-vl-{tiny.VERSION}" and (first / "config.json").exists()
    assert tiny_model("tiny:qwen2-vl") == first and len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == [f"tiny-qwen2-vl-{tiny.VERSION}"]  # no temp dirs left
    assert resolve_model("tiny:qwen2-vl") == str(first)


def test_failed_build_leaves_no_directory(tmp_path: Path, monkeypatch):
    def broken(out_dir: Path, seed: int = 0) -> Path:
        raise RuntimeError("boom")

    monkeypatch.setitem(tiny.BUILDERS, "tiny:llava", broken)
    with pytest.raises(RuntimeError, match="boom"):
        tiny_model("tiny:llava", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unknown_names_and_passthrough(tmp_path):
    with pytest.raises(ModelError, match="tiny:llava.*tiny:qwen2-vl"):
        tiny_model("tiny:gpt")
    assert resolve_model("Qwen/Qwen2-VL-2B-Instruct") == "Qwen/Qwen2-VL-2B-Instruct"
    assert resolve_model(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("path", ["/no/such/model", "./no-such-model", "runs/x/sft/model"])
def test_a_missing_local_model_is_an_error_naming_it(path):
    with pytest.raises(ModelError, match=f"model {re.escape(path)}: no such directory"):
        resolve_model(path)
