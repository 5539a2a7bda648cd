"""Tiny vision-language models built offline from random weights, for tests and the quickstart.

Nothing may come from a model hub, so each builder trains a small byte-level BPE tokenizer on the
shapes world's text, initialises a few-layer model from a seed and saves an ordinary HF model
directory (config, weights, processor, tokenizer with a chat template, generation config).
One builder per model family (`BUILDERS`), each with the family's own processor class, special
tokens and chat-template shape, and images small enough for a few image tokens; docs/families.md
says which stages each runs. Weights are saved with `save_model`, under the names vLLM reads.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from alignkit.errors import ModelError
from alignkit.models.loading import save_model
from alignkit.worlds.shapes import corpus

# Bump when a builder's output changes, so cached directories are rebuilt.
VERSION = "v2"

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


def _train_tokenizer(
    special: list[str],
    vocab_size: int = 800,
    *,
    eos: str = "<|im_end|>",
    pad: str = "<|endoftext|>",
    extra: dict[str, str] | None = None,
):
    """A byte-level BPE tokenizer over shapes-world and template text, special tokens first.

    `extra` names family tokens the processor reads as tokenizer attributes (Gemma 3's
    `boi_token`, InternVL's `context_image_token`, ...).
    """
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
        eos_token=eos,
        pad_token=pad,
        padding_side="left",
        extra_special_tokens=extra or {},
    )


def _save_generation_config(out_dir: Path, tokenizer, stops: tuple[str, str] = ("<|im_end|>", "<|endoftext|>")) -> None:
    """Two eos ids (end of turn, end of text), as the families' hub generation configs have; pad is the second."""
    from transformers import GenerationConfig

    eos = [tokenizer.convert_tokens_to_ids(t) for t in stops]
    config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, bos_token_id=eos[1])
    config.save_pretrained(out_dir)


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
    """A 2-layer LLaVA (Llama text, hidden 128) with a 2-layer CLIP tower on 112x112 images."""
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
    save_model(model, out_dir)
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


def chat_template(prefix: dict[str, str], suffix: dict[str, str], image: str, *, bos: str = "") -> str:
    """A Jinja chat template: each turn is `prefix[role]`, its content (text, `image` for each image
    part), `suffix[role]`; the generation prompt is `prefix["assistant"]`. A family without a system
    role (no "system" in `prefix`) gets the system text at the start of the first user turn, as
    Gemma 3's own template does."""

    def by_role(table: dict[str, str]) -> str:
        cases = "".join(f"{{% elif message['role'] == '{r}' %}}{v}" for r, v in table.items())
        return cases.replace("{% elif", "{% if", 1) + "{% endif %}"

    content = (
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}}{image}"
        "{% elif 'text' in part %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    )
    fold = "system" not in prefix
    system = (
        "{% if message['role'] == 'system' %}{% set ns.system = (message['content'] if message['content'] is string "
        "else message['content'][0]['text']) + '\\n\\n' %}{% else %}"
    )
    turn = by_role(prefix) + ("{{ ns.system }}{% set ns.system = '' %}" if fold else "") + content + by_role(suffix)
    return (
        bos + "{% set ns = namespace(system='') %}{% for message in messages %}"
        + (system + turn + "{% endif %}" if fold else turn)
        + "{% endfor %}{% if add_generation_prompt %}" + prefix["assistant"] + "{% endif %}"
    )  # fmt: skip


CHATML = (
    {r: f"<|im_start|>{r}\n" for r in ("system", "user", "assistant")},
    dict.fromkeys(("system", "user", "assistant"), "<|im_end|>\n"),
)


def _text_config(tokenizer, **overrides) -> dict:
    """A 2-layer language model (hidden 128, 2 heads of 64) over `tokenizer`'s vocabulary."""
    config = dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return config | overrides


def _save(
    out_dir: Path, model_class, config, processor, seed: int, stops: tuple[str, str] = ("<|im_end|>", "<|endoftext|>")
) -> Path:
    """Random float32 weights from `seed` (no weight matrix left at zero), the processor, the
    tokenizer with the processor's chat template, and the generation config, saved in `out_dir`."""
    import torch

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    # hub weights are trained; a matrix left at zero (Gemma 3's projector) would cut the image off
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, 0.02)
    save_model(model, out_dir)
    processor.save_pretrained(out_dir)
    processor.tokenizer.chat_template = processor.chat_template
    processor.tokenizer.save_pretrained(out_dir)
    _save_generation_config(out_dir, processor.tokenizer, stops)
    return out_dir


def _qwen_vision(**overrides) -> dict:
    return dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128) | overrides


QWEN_ROPE = {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0}


def build_tiny_qwen2_5_vl(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen2.5-VL (window attention in its 2-layer vision tower); 112x112 images, 16 image tokens."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor

    tokenizer = _train_tokenizer(QWEN_SPECIAL)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    config = Qwen2_5_VLConfig(
        text_config=_text_config(tokenizer, rope_parameters=QWEN_ROPE),
        vision_config=_qwen_vision(fullatt_block_indexes=[1], window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_CHAT_TEMPLATE,
    )  # fmt: skip
    return _save(out_dir, Qwen2_5_VLForConditionalGeneration, config, processor, seed)


def build_tiny_qwen3_vl(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen3-VL (interleaved mrope, deepstack from its 2-layer vision tower); patch 16, so
    128x128 images give 16 image tokens."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl import Qwen3VLVideoProcessor

    tokenizer = _train_tokenizer(QWEN_SPECIAL)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    config = Qwen3VLConfig(
        text_config=_text_config(tokenizer, rope_parameters=QWEN_ROPE | {"mrope_interleaved": True}),
        vision_config=_qwen_vision(patch_size=16, deepstack_visual_indexes=[1], num_position_embeddings=64),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(patch_size=16, min_pixels=64 * 64, max_pixels=128 * 128),
        tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(), chat_template=QWEN_CHAT_TEMPLATE,
    )  # fmt: skip
    return _save(out_dir, Qwen3VLForConditionalGeneration, config, processor, seed)


GEMMA3_SPECIAL = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>"]  # fmt: skip


def build_tiny_gemma3(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Gemma 3 with a 2-layer SigLIP tower on 64x64 images pooled to 4 soft tokens. Its
    chat template has no system role (the system text opens the first user turn)."""
    from tokenizers import AddedToken
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    extra = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = _train_tokenizer(GEMMA3_SPECIAL, eos="<end_of_turn>", pad="<pad>", extra=extra)
    # Gemma's vocabulary has runs of newlines as tokens, and vLLM's Gemma 3 processor looks them up
    tokenizer.add_tokens([AddedToken("\n" * n, normalized=False) for n in range(1, 5)])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GEMMA3_SPECIAL}
    config = Gemma3Config(
        text_config=_text_config(tokenizer, bos_token_id=ids["<bos>"], sliding_window=64, query_pre_attn_scalar=64),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        mm_tokens_per_image=4, boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )  # fmt: skip
    turns = {"user": "<start_of_turn>user\n", "assistant": "<start_of_turn>model\n"}
    template = chat_template(turns, dict.fromkeys(turns, "<end_of_turn>\n"), "<start_of_image>", bos="<bos>")
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 64, "width": 64}),
        tokenizer=tokenizer, chat_template=template, image_seq_length=4,
    )  # fmt: skip
    return _save(out_dir, Gemma3ForConditionalGeneration, config, processor, seed, ("<end_of_turn>", "<eos>"))


IDEFICS3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>",
                    "<fake_token_around_image>", "<image>", "<global-img>"]  # fmt: skip


# Idefics3 and SmolVLM share the tokenizer, text/vision sizes and chat template; images are 64x64
# (no splitting), pixel-shuffled to 4 image tokens.
IDEFICS3_SIZES = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 64})
IDEFICS3_STOPS = ("<end_of_utterance>", "<|endoftext|>")


def _idefics3_parts(config_class):
    """The tokenizer, config (Llama text, 2-layer SigLIP-style tower, scale factor 2) and chat template
    of an Idefics3-style model (`Idefics3Config` or `SmolVLMConfig`)."""
    tokenizer = _train_tokenizer(IDEFICS3_SPECIAL, eos="<end_of_utterance>")
    config = config_class(
        text_config=_text_config(tokenizer, model_type="llama"),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    turns = {"system": "<|im_start|>System: ", "user": "<|im_start|>User:", "assistant": "<|im_start|>Assistant:"}
    template = chat_template(turns, dict.fromkeys(turns, "<end_of_utterance>\n"), "<image>")
    return tokenizer, config, template


def build_tiny_idefics3(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Idefics3 (SmolVLM v1's architecture): Llama text, a 2-layer SigLIP tower on 64x64
    images, pixel shuffle to 4 image tokens, no image splitting."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    tokenizer, config, template = _idefics3_parts(Idefics3Config)
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(do_image_splitting=False, **IDEFICS3_SIZES), tokenizer=tokenizer,
        chat_template=template, image_seq_len=4,
    )  # fmt: skip
    return _save(out_dir, Idefics3ForConditionalGeneration, config, processor, seed, IDEFICS3_STOPS)


def build_tiny_smolvlm(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer SmolVLM (SmolVLM2's own classes, the Idefics3 build's sizes and tokens) with its
    image and video processors; 64x64 images, 4 image tokens. Its processor needs `num2words`."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor, SmolVLMProcessor
    from transformers.models.smolvlm import SmolVLMVideoProcessor

    tokenizer, config, template = _idefics3_parts(SmolVLMConfig)
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(do_image_splitting=False, **IDEFICS3_SIZES), tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(**IDEFICS3_SIZES), chat_template=template, image_seq_len=4,
    )  # fmt: skip
    return _save(out_dir, SmolVLMForConditionalGeneration, config, processor, seed, IDEFICS3_STOPS)


def build_tiny_llava_onevision(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer LLaVA-OneVision (Qwen2 text, 2-layer SigLIP tower on 28x28 tiles, one grid
    pinpoint), so an image is a few dozen tokens: base tile, one crop and row newlines."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
    )
    from transformers.models.llava_onevision import LlavaOnevisionVideoProcessor

    tokenizer = _train_tokenizer(LLAVA_SPECIAL + ["<video>"])
    config = LlavaOnevisionConfig(
        text_config=_text_config(tokenizer, model_type="qwen2"),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=[[28, 28]], vision_feature_select_strategy="full", vision_feature_layer=-1,
    )  # fmt: skip
    template = chat_template(*CHATML, "<image>\n")
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": 28, "width": 28}, image_grid_pinpoints=[[28, 28]]),
        tokenizer=tokenizer, video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=4,
        vision_feature_select_strategy="full", chat_template=template,
    )  # fmt: skip
    return _save(out_dir, LlavaOnevisionForConditionalGeneration, config, processor, seed)


INTERNVL_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]


def build_tiny_internvl(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer InternVL (transformers-native, Qwen2 text) with a 2-layer InternViT on 56x56 images,
    pixel-unshuffled to 4 image tokens, one tile per image."""
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.internvl import InternVLVideoProcessor

    extra = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}  # fmt: skip
    tokenizer = _train_tokenizer(INTERNVL_SPECIAL, extra=extra)
    config = InternVLConfig(
        text_config=_text_config(tokenizer, model_type="qwen2"),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=[56, 56], patch_size=[14, 14]),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5,
    )  # fmt: skip
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size={"height": 56, "width": 56}, crop_to_patches=False, max_patches=1),
        tokenizer=tokenizer, video_processor=InternVLVideoProcessor(), image_seq_length=4,
        chat_template=chat_template(*CHATML, "<IMG_CONTEXT>\n"),
    )  # fmt: skip
    return _save(out_dir, InternVLForConditionalGeneration, config, processor, seed)


MISTRAL3_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[IMG]", "[IMG_BREAK]", "[IMG_END]"]  # fmt: skip


def build_tiny_mistral3(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Mistral 3 with a 2-layer Pixtral tower on 64x64 images, patches merged 2x2, so
    an image is 2x2 tokens with row breaks (6 tokens)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessor, PixtralProcessor

    tokenizer = _train_tokenizer(MISTRAL3_SPECIAL, eos="</s>", pad="<pad>")
    config = Mistral3Config(
        text_config=_text_config(tokenizer, model_type="mistral", bos_token_id=tokenizer.convert_tokens_to_ids("<s>")),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           head_dim=32, image_size=64, patch_size=16),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
    )  # fmt: skip
    turns = {"system": "[SYSTEM_PROMPT]", "user": "[INST]", "assistant": ""}
    ends = {"system": "[/SYSTEM_PROMPT]", "user": "[/INST]", "assistant": "</s>"}
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessor(size={"longest_edge": 64}, patch_size=16),
        tokenizer=tokenizer, patch_size=16, spatial_merge_size=2, chat_template=chat_template(turns, ends, "[IMG]", bos="<s>"),
    )  # fmt: skip
    return _save(out_dir, Mistral3ForConditionalGeneration, config, processor, seed, ("</s>", "<pad>"))


# The vision-language model families (`policy.model`, the family tests and table).
BUILDERS = {
    "tiny:qwen2-vl": build_tiny_qwen2_vl,
    "tiny:qwen2.5-vl": build_tiny_qwen2_5_vl,
    "tiny:qwen3-vl": build_tiny_qwen3_vl,
    "tiny:llava": build_tiny_llava,
    "tiny:llava-onevision": build_tiny_llava_onevision,
    "tiny:idefics3": build_tiny_idefics3,
    "tiny:smolvlm": build_tiny_smolvlm,
    "tiny:gemma3": build_tiny_gemma3,
    "tiny:internvl": build_tiny_internvl,
    "tiny:mistral3": build_tiny_mistral3,
}
# Tiny models that are not VLMs: the CLIP of `levels.model`.
OTHER_BUILDERS = {"tiny:clip": build_tiny_clip}


def default_cache_dir() -> Path:
    """Where `tiny_model` keeps built models: $ALIGNKIT_CACHE, else ~/.cache/alignkit."""
    return Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit"))


def tiny_model(name: str, cache_dir: Path | None = None) -> Path:
    """The directory of a named tiny model, built (atomically) on first use."""
    build = BUILDERS.get(name) or OTHER_BUILDERS.get(name)
    if build is None:
        raise ModelError(f"unknown tiny model {name!r}; known: {sorted(BUILDERS | OTHER_BUILDERS)}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}-{VERSION}"
    if final.exists():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    try:
        build(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.exists():  # a concurrent builder winning the rename is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
