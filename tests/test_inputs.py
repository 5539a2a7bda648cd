"""One encoder for SFT, PPO and the reward model: token ids, labels and padding by hand on the tiny Qwen2-VL."""

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from alignkit.models.inputs import IGNORE, collate, encode, extend


@pytest.fixture(scope="module")
def processor(tiny_qwen_dir):
    return AutoProcessor.from_pretrained(tiny_qwen_dir)


def _chat(question: str, images: int = 1):
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


ANSWER = [{"role": "assistant", "content": [{"type": "text", "text": "a red square"}]}]


def test_conversation_with_completion_labels_only_the_completion(processor):
    image = Image.new("RGB", (56, 56), "red")
    enc = encode(processor, _chat("What is in the image?"), [image], ANSWER)
    tok = processor.tokenizer
    # by hand: the prompt's tokens (its image expanded into image_pad tokens), then the answer turn's
    prompt_text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the image?<|im_end|>\n<|im_start|>assistant\n"
    assert processor.apply_chat_template(_chat("What is in the image?"), add_generation_prompt=True).endswith(prompt_text)
    prompt_ids = processor(text=[processor.apply_chat_template(_chat("What is in the image?"), add_generation_prompt=True)],
                           images=[image], return_tensors="pt")["input_ids"][0]  # fmt: skip
    answer_ids = tok("a red square<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert enc["input_ids"].tolist() == prompt_ids.tolist() + answer_ids
    assert enc["labels"].tolist() == [IGNORE] * len(prompt_ids) + answer_ids
    assert enc["attention_mask"].tolist() == [1] * len(enc["input_ids"])
    merge = processor.image_processor.merge_size**2
    pads = (enc["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum().item()
    assert pads == enc["image_grid_thw"].prod().item() // merge  # one image slot per merged patch
    assert enc["pixel_values"].shape[0] == enc["image_grid_thw"].prod().item()  # per-image outputs passed through


def test_token_completion_is_appended_and_labelled(processor):
    prompt = encode(processor, _chat("Count the shapes.", images=0))
    assert (prompt["labels"] == IGNORE).all() and "pixel_values" not in prompt
    enc = extend(prompt, [11, 12, 13])
    n = len(prompt["input_ids"])
    assert enc["input_ids"].tolist() == prompt["input_ids"].tolist() + [11, 12, 13]
    assert enc["labels"].tolist() == [IGNORE] * n + [11, 12, 13]
    assert enc["attention_mask"][n:].tolist() == [1, 1, 1]
    assert torch.equal(encode(processor, _chat("Count the shapes.", images=0), None, [11, 12, 13])["input_ids"], enc["input_ids"])
    # rendered text is taken as it is
    text = "<|im_start|>user\nhi<|im_end|>\n"
    assert processor.tokenizer.decode(encode(processor, text)["input_ids"]) == text
    with pytest.raises(TypeError):
        encode(processor, text, None, ANSWER)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_per_token_tensors_and_concatenates_image_tensors(processor, side):
    image = Image.new("RGB", (56, 56), "blue")
    with_image = encode(processor, _chat("What is it?"), [image], ANSWER)
    text_only = extend(encode(processor, _chat("Hi?", images=0)), [5])
    pad = processor.tokenizer.pad_token_id
    batch = collate([text_only, with_image], pad, side=side)
    n, width = len(text_only["input_ids"]), len(with_image["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    real = slice(0, n) if side == "right" else slice(width - n, width)
    padding = slice(n, width) if side == "right" else slice(0, width - n)
    assert batch["input_ids"][0, real].tolist() == text_only["input_ids"].tolist()
    assert batch["labels"][0, real].tolist() == text_only["labels"].tolist()
    assert (batch["input_ids"][0, padding] == pad).all() and (batch["labels"][0, padding] == IGNORE).all()
    assert (batch["attention_mask"][0, padding] == 0).all() and batch["attention_mask"].sum(1).tolist() == [n, width]
    assert torch.equal(batch["input_ids"][1], with_image["input_ids"])
    assert torch.equal(batch["pixel_values"], with_image["pixel_values"])  # the one image, from the one example with it
    assert torch.equal(batch["image_grid_thw"], with_image["image_grid_thw"])
    two = collate([with_image, with_image], pad)
    assert two["pixel_values"].shape[0] == 2 * with_image["pixel_values"].shape[0] and two["image_grid_thw"].shape[0] == 2
