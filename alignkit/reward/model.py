"""The critique reward model: a VLM whose LM head writes critiques, plus a scalar reward head.

The head is a Linear on the final hidden state at the last non-padding token, i.e. after the
critique. A saved reward model is one directory:

    reward_model.json   base model, finetune mode, format version
    head.safetensors    the reward head
    adapter/            the PEFT adapter (finetune: lora), or backbone/ with full weights (finetune: full)
    processor files     tokenizer, image processor, chat template
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from alignkit.records import RecordError, atomic_output

FORMAT = "alignkit-critique-rm/1"
Finetune = Literal["lora", "full"]


@dataclass
class RewardOutput:
    """Scores per sequence, and the LM logits/targets at critique tokens for the critique loss."""

    rewards: torch.Tensor  # [batch]
    critique_logits: torch.Tensor  # [num critique tokens, vocab]
    critique_targets: torch.Tensor  # [num critique tokens]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last non-padding token (left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask * positions).argmax(dim=1)


class RewardModel(nn.Module):
    """Backbone (a transformers VLM, optionally wrapped by PEFT) + `head` scoring the final hidden state."""

    def __init__(self, backbone: nn.Module, processor, base_model: str, finetune: Finetune, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.processor = processor
        self.base_model = base_model
        self.finetune = finetune
        # PEFT injects its layers in place, so the underlying model runs the adapter too.
        self.lm = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
        hidden = self.lm.config.get_text_config().hidden_size
        self.head = head if head is not None else nn.Linear(hidden, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None, **vision) -> RewardOutput:
        hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask, **vision).last_hidden_state
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        rewards = self.head(last.float()).squeeze(-1).float()  # fp32 for the loss, also under autocast
        if labels is None:
            labels = torch.full_like(input_ids, -100)
        # Position t predicts token t+1; the LM head runs on critique positions only.
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep])
        return RewardOutput(rewards, logits, targets[keep])

    def save(self, path: str | Path) -> Path:
        """Write the reward model directory atomically (a temporary name, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_output(path) as tmp:
            tmp.mkdir(parents=True)
            if self.finetune == "lora":
                self.backbone.save_pretrained(tmp / "adapter")
            else:
                self.lm.save_pretrained(tmp / "backbone")
            save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, tmp / "head.safetensors")
            self.processor.save_pretrained(tmp)
            meta = {"format": FORMAT, "base_model": self.base_model, "finetune": self.finetune}
            (tmp / "reward_model.json").write_text(json.dumps(meta, indent=2))
        return path


def build_reward_model(
    model: str,
    finetune: Finetune = "lora",
    *,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: list[str] | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> RewardModel:
    """A fresh reward model on a VLM (hub id, local path or `tiny:...`), LoRA or fully trainable;
    `dtype` and `attn_implementation` as `load_policy`'s (training passes float32: accelerate runs the
    compute in mixed precision)."""
    from alignkit.models import load_policy, lora_config, resolve_model

    lm, processor = load_policy(resolve_model(model), dtype, attn_implementation=attn_implementation)
    if finetune == "lora":
        from peft import get_peft_model

        return RewardModel(get_peft_model(lm, lora_config(lora_r, lora_alpha, lora_dropout, target_modules, lm)), processor, model, finetune)
    if finetune != "full":
        raise ValueError(f"finetune must be 'lora' or 'full', got {finetune!r}")
    return RewardModel(lm, processor, model, finetune)


def load_reward_model(
    path: str | Path, dtype: torch.dtype | None = None, attn_implementation: str | None = None
) -> RewardModel:
    """Load a reward model directory written by `RewardModel.save`, in eval mode (`dtype` and
    `attn_implementation` as `load_policy`'s)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from alignkit.models import default_dtype, load_policy, resolve_model

    path = Path(path)
    meta_file = path / "reward_model.json"
    if not meta_file.is_file():
        raise RecordError(f"{meta_file}: not found; {path} is not a reward model directory (see `alignkit train-rm`)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise RecordError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta["finetune"] == "lora":
        from peft import PeftModel

        base, _ = load_policy(resolve_model(meta["base_model"]), dtype, attn_implementation=attn_implementation)
        backbone = PeftModel.from_pretrained(base, str(path / "adapter"))
    else:
        attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
        backbone = AutoModelForImageTextToText.from_pretrained(str(path / "backbone"), dtype=dtype or default_dtype(), **attn)
    head_state = load_file(str(path / "head.safetensors"))
    head = nn.Linear(head_state["weight"].shape[1], 1)
    head.load_state_dict(head_state)
    rm = RewardModel(backbone, AutoProcessor.from_pretrained(str(path)), meta["base_model"], meta["finetune"], head)
    return rm.eval()
