"""Tiny vision-language models built offline from random weights, for tests and the quickstart.

Nothing may come from a model hub, so each builder trains a small byte-level BPE tokenizer on the
shapes world's text, initialises a few-layer model from a seed and saves an ordinary HF model
directory (config, weights, processor, tokenizer with a chat template, generation config).
Qwen2-VL is the one to use with vLLM: vLLM 0.32 cannot load a LLaVA saved by transformers 5.19.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from alignkit.errors import ModelError
from alignkit.worlds.shapes import corpus

# Bump when a builder's output changes, so cached directories are rebuilt.
VERSION = "v1"

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]  # fmt: skip
LLAVA_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]

# Words the chain-of-thought templates and chat template use, so they tokenize compactly.
TEMPLATE_TEXT = [
    "system", "user", "assistant", "You are a helpful assistant.",
    "Think step by step, then give the final answer on the last line as 'Answer: <answer>'.",
    "Think inside <think></think> tags, then give the final answer after them.",
    "<think>", "</think>", "Answer:", "Let me look at the image step by step.",
    "I see", "The answer is", "so", "First,", "Then,", "Finally,", "yes", "no",
    "0 1 2 3 4 5 6 7 8 9", "one two three four",
]  # fmt: skip

# Qwen2-VL's own template (content strings or lists of {"type": "image"} / {"type": "text"}).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>\n")


def _train_tokenizer(special: list[str], vocab_size: int = 800):
    """A byte-level BPE tokenizer over shapes-world and template text, special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus() + TEMPLATE_TEXT * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )


def _save_generation_config(out_dir: Path, tokenizer) -> None:
    from transformers import GenerationConfig

    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    GenerationConfig(eos_token_id=eos, pad_token_id=eos[1], bos_token_id=eos[1]).save_pretrained(out_dir)


def build_tiny_qwen2_vl(out_dir: Path, seed: int = 0, *, hidden_size: int = 128, num_layers: int = 2) -> Path:
    """A 2-layer Qwen2-VL (hidden 128, 2 heads of 64, 2-layer vision tower) that vLLM can load.

    112x112 images become 16 image tokens. Head size 64 because vLLM's CPU attention rejects
    small heads; mrope sections sum to head_dim/2 as Qwen2-VL requires. `hidden_size` (a
    multiple of 64) and `num_layers` scale the language model, e.g. for benchmarks where the
    model's own compute, not per-step overhead, should dominate.
    """
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil, Qwen2VLProcessor, Qwen2VLVideoProcessor

    out_dir = Path(out_dir)
    tokenizer = _train_tokenizer(QWEN_SPECIAL)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=hidden_size // 64,
            num_key_value_heads=hidden_size // 64,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=2, embed_dim=128, hidden_size=hidden_size, num_heads=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32)
    model.save_pretrained(out_dir)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    _save_generation_config(out_dir, tokenizer)
    return out_dir


def build_tiny_llava(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer LLaVA (Llama text, hidden 128) with a 2-layer CLIP tower on 112x112 images.

    For transformers/TRL paths only; vLLM cannot load it.
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,  # fmt: skip
        LlavaProcessor,
    )

    out_dir = Path(out_dir)
    tokenizer = _train_tokenizer(LLAVA_SPECIAL)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            image_size=112, patch_size=14, projection_dim=64,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        image_token_index=ids["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    image_processor = CLIPImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _save_generation_config(out_dir, tokenizer)
    return out_dir


def build_tiny_clip(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer CLIP (text and vision width 64, projection 32) on 112x112 images, for `levels.model`.

    The tokenizer is the same locally trained BPE, with CLIP's start/end/pad tokens; the text
    model pools at the end-of-text token, whose id the config names.
    """
    import torch
    from tokenizers import processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out_dir = Path(out_dir)
    special = ["<|endoftext|>", "<|startoftext|>"]
    tokenizer = _train_tokenizer(special)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    # CLIP's own framing: start token, text, end token (the text model pools at the first end token)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[(t, ids[t]) for t in special]
    )
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "<|startoftext|>", "<|endoftext|>", "<|endoftext|>"
    tokenizer.padding_side = "right"
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=ids["<|startoftext|>"],
            eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=112, patch_size=16),
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(seed)
    CLIPModel(config).to(torch.float32).save_pretrained(out_dir)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


BUILDERS = {"tiny:qwen2-vl": build_tiny_qwen2_vl, "tiny:llava": build_tiny_llava, "tiny:clip": build_tiny_clip}


def default_cache_dir() -> Path:
    """Where `tiny_model` keeps built models: $ALIGNKIT_CACHE, else ~/.cache/alignkit."""
    return Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit"))


def tiny_model(name: str, cache_dir: Path | None = None) -> Path:
    """The directory of a named tiny model, built (atomically) on first use."""
    if name not in BUILDERS:
        raise ModelError(f"unknown tiny model {name!r} (policy.model); known: {sorted(BUILDERS)}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}-{VERSION}"
    if final.exists():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    try:
        BUILDERS[name](tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.exists():  # a concurrent builder winning the rename is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
