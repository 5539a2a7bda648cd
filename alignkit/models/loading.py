"""Models: resolve a name, load a VLM with its processor (and adapter), LoRA config, merge, unwrap.

The one place sample, train, reward and evaluate get a model from. torch, transformers and peft
are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from alignkit.errors import ModelError, SetupError
from alignkit.records import atomic_output

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel
    from torch import nn
    from transformers import PreTrainedModel, ProcessorMixin

# Attention and MLP projections of Llama/Qwen-style language models (Qwen2-VL, Qwen2.5-VL, LLaVA).
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The language model's submodule in transformers 5 VLMs (`text_model` in Idefics-style models).
LANGUAGE_MODEL = r"(language_model|text_model)"


def resolve_model(name_or_path: str) -> str:
    """Names "tiny:..." become a built directory; hub ids and local paths pass through unchanged.

    A local path (absolute, relative with `./` or `../`, or of more than two parts, which no hub id
    has) that does not exist is a ModelError naming it, not the hub client's complaint about a
    malformed repository id.
    """
    if name_or_path.startswith("tiny:"):
        from alignkit.models.tiny import tiny_model

        return str(tiny_model(name_or_path))
    local = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if local and not Path(name_or_path).exists():
        raise ModelError(f"model {name_or_path}: no such directory (a hub id is 'namespace/name')")
    return name_or_path


def default_dtype() -> torch.dtype:
    """bf16 where the GPU supports it, else float32 (CPU bf16 is slow and lossy)."""
    import torch

    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def place(model: nn.Module) -> nn.Module:
    """An inference model on this process's device (`process_state().device`); training loops get
    theirs from `accelerator.prepare`."""
    from alignkit.models.device import process_state

    return model.to(process_state().device)


def quantization_4bit(compute_dtype: torch.dtype):
    """QLoRA's 4-bit NF4 base-model quantization; a clear error where bitsandbytes cannot run."""
    import torch

    if not torch.cuda.is_available():
        raise SetupError(
            "QLoRA (finetune='qlora') loads the base model in 4 bits with bitsandbytes, which needs a CUDA GPU, "
            "and none is visible. Use finetune='lora' or finetune='full' on this machine."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SetupError("QLoRA (finetune='qlora') needs bitsandbytes: `uv sync --extra gpu`.") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_policy(
    name_or_path: str,
    dtype: torch.dtype | str | None = None,
    load_in_4bit: bool = False,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a vision-language model and its processor; `load_in_4bit` quantizes it for QLoRA (GPU only).

    `dtype` defaults to `default_dtype()`; "auto" keeps the dtype the weights were saved in.
    `attn_implementation` (train.attn_implementation) picks the attention kernel; one that cannot
    run here is a clear error.
    """
    from transformers import AutoModelForImageTextToText

    dtype = dtype or default_dtype()
    gpu = int(os.environ.get("LOCAL_RANK", "0"))  # under a launch: this process's GPU
    options = {"quantization_config": quantization_4bit(dtype), "device_map": {"": gpu}} if load_in_4bit else {}
    if attn_implementation:
        options["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype, **options)
    except (ImportError, ValueError) as e:
        if not attn_implementation or attn_implementation not in str(e).replace("FlashAttention2", "flash_attention_2"):
            raise
        raise ModelError(f"train.attn_implementation: {attn_implementation!r} cannot load {name_or_path} here: "
                         f"{str(e).splitlines()[0]}") from None  # fmt: skip
    return model, load_processor(name_or_path)


def load_processor(name_or_path: str | Path) -> ProcessorMixin:
    """The processor (tokenizer, image processor, chat template) saved with a model or adapter."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(name_or_path)


def load_adapter(model: PreTrainedModel, adapter: str | Path) -> PeftModel:
    """`model` with the PEFT adapter saved in `adapter` applied (not merged)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter))


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (adapters are injected in place, so they still run)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lora_config(
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
    model: nn.Module | None = None,
) -> LoraConfig:
    """A LoRA config on the language model's projections.

    A list of module names (default: `DEFAULT_TARGET_MODULES`) is matched inside the language model
    only: LLaVA's CLIP tower also has `q_proj`/`k_proj`/`v_proj`, and adapting the vision tower is
    not what preference tuning of the answers needs. A string is passed to PEFT as a regex as-is,
    for the rare case that should reach the vision tower or the projector. Given the `model`, a
    pattern that matches none of its modules is a ModelError naming the model (PEFT's own error
    does not say which setting to change).
    """
    from peft import LoraConfig

    if target_modules is None or isinstance(target_modules, list):
        names = "|".join(re.escape(n) for n in (target_modules or DEFAULT_TARGET_MODULES))
        target_modules = rf"(.*\.)?{LANGUAGE_MODEL}\..*\.({names})"
    if model is not None and not any(re.fullmatch(target_modules, name) for name, _ in model.named_modules()):
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise ModelError(
            f"LoRA targets {target_modules!r} (the section's target_modules) match no module of "
            f"{getattr(model, 'name_or_path', '') or type(model).__name__} ({type(model).__name__}); "
            f"its linear layers are named {linear}"
        )
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )


def save_model(model: PreTrainedModel, out_dir: Path) -> None:
    """`model.save_pretrained(out_dir)` with a CLIP or SigLIP vision tower's weights under the hub
    checkpoints' names (`vision_tower.vision_model.*`).

    transformers 5 writes them one level up (`vision_tower.*`) and reads either; vLLM reads only the
    hub names, so without this it cannot load a LLaVA, LLaVA-OneVision or Gemma 3 saved here.
    """
    from safetensors.torch import load_file, save_file

    model.save_pretrained(out_dir)
    tower = getattr(getattr(model, "model", model), "vision_tower", None)
    if type(tower).__name__ not in HUB_NESTED_TOWERS:
        return
    for shard in Path(out_dir).glob("*.safetensors"):
        weights = load_file(shard)
        if any(_hub_name(k) != k for k in weights):
            save_file({_hub_name(k): v for k, v in weights.items()}, shard, metadata={"format": "pt"})
    index = Path(out_dir) / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {_hub_name(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


# Vision towers that hub checkpoints store with a `vision_model.` level.
HUB_NESTED_TOWERS = {"CLIPVisionModel", "SiglipVisionModel"}


def _hub_name(key: str) -> str:
    flat = key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model.")
    return "vision_tower.vision_model." + key[len("vision_tower.") :] if flat else key


def merge_adapter(model: str, adapter: str | None, out_dir: Path) -> Path:
    """Save `model` with `adapter` merged into its weights (a copy of `model` when there is none).

    Iterated rounds start from the previous round's policy as a plain model, so the next round's
    LoRA reference (adapters disabled) is that policy. Written to a temporary name, then renamed.
    """
    import shutil

    from transformers import AutoModelForImageTextToText, GenerationConfig

    with atomic_output(out_dir) as tmp:
        if adapter is None:
            shutil.copytree(model, tmp)
        else:
            base = AutoModelForImageTextToText.from_pretrained(model, dtype="auto")
            stored_dtype = base.dtype  # merge in float32, save in the base's own dtype (bf16 stays bf16)
            merged = load_adapter(base.float(), adapter).merge_and_unload()
            save_model(merged.to(stored_dtype), tmp)
            load_processor(model).save_pretrained(tmp)
            GenerationConfig.from_pretrained(model).save_pretrained(tmp)
    return Path(out_dir)
