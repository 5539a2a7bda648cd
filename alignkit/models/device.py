"""Device, precision, processes and memory settings of every loop that runs a model, from accelerate.

No loop picks a device or a dtype itself: accelerate places the model (`accelerator.device`: the
process's GPU under torchrun/accelerate launch, else the CPU) and runs the forward pass in mixed
precision. The `train` section's `mixed_precision`, `gradient_checkpointing` and
`attn_implementation` (gathered in `ComputeSettings`) apply to every stage that trains or scores a
model: sft, train (DPO, MM-DPO, PPO), reward_model and score.

Precision: `auto` is what an accelerate config file asked for (`launch.config_file`, passed on by
`accelerate launch` as ACCELERATE_MIXED_PRECISION), else bf16 on a GPU that supports it, else
fp32 (`no`; CPU bf16 is slow and lossy). The hand-written loops keep float32 weights and compute in
the mixed precision; TRL's trainers load the policy in bf16 when the compute is bf16.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from alignkit.errors import SetupError

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState
    from torch import nn


# The `train` keys every stage that trains or scores a model declares.
COMPUTE_KEYS = ("train.mixed_precision", "train.gradient_checkpointing", "train.attn_implementation")


@dataclass(frozen=True)
class ComputeSettings:
    """The `train` section's precision and memory keys, as every model loader and loop takes them."""

    mixed_precision: str = "auto"
    """auto | bf16 | fp16 | no (see the module docstring)."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass; None: on with a GPU (memory for 2-8B models), off on
    a CPU (where it only made steps ~3x slower)."""
    attn_implementation: str | None = None
    """Passed to `from_pretrained` (sdpa, eager, flash_attention_2, ...); None: transformers' default."""

    @classmethod
    def of(cls, train: Any) -> ComputeSettings:
        """From the `train` section (`alignkit.train.config.TrainConfig`), whose keys these are."""
        return cls(train.mixed_precision, train.gradient_checkpointing, train.attn_implementation)

    def precision(self) -> str:
        """The mixed precision to run in: bf16, fp16 or no; a clear error where the hardware lacks it."""
        if self.mixed_precision == "auto":
            if precision := os.environ.get("ACCELERATE_MIXED_PRECISION"):
                return precision
            return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise SetupError("train.mixed_precision: fp16 needs a CUDA GPU and none is visible; use 'auto', "
                             "'bf16' or 'no'")  # fmt: skip
        return self.mixed_precision

    def dtype(self) -> torch.dtype:
        """The dtype a TRL-trained policy is loaded in: bf16 where the compute is bf16, else float32
        (fp16 mixed precision keeps float32 master weights)."""
        return torch.bfloat16 if self.precision() == "bf16" else torch.float32

    def checkpointing(self) -> bool:
        if self.gradient_checkpointing is None:
            return torch.cuda.is_available()
        return self.gradient_checkpointing

    def load_options(self) -> dict[str, Any]:
        """Keyword arguments for `from_pretrained` (through `alignkit.models.load_policy`)."""
        return {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}

    def for_training(self, model: nn.Module) -> nn.Module:
        """Turn on gradient checkpointing where asked (non-reentrant: works with frozen LoRA bases)."""
        if self.checkpointing():
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model


def process_state() -> PartialState:
    """This process's place among the processes of a stage, as accelerate sees it (one process, rank 0,
    on cuda:0 or the CPU outside a launch; its own GPU under one)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def require_replicated(distributed_type: str, loop: str) -> None:
    """Stop a hand-written loop under FSDP or DeepSpeed: it saves and checkpoints the main process's
    whole model, which those shard. TRL's trainers (DPO, MM-DPO) handle sharded states themselves."""
    if distributed_type in ("FSDP", "DEEPSPEED"):
        raise SetupError(
            f"the {loop} loop runs with DDP (a whole model per process), and the accelerate config "
            f"(launch.config_file) asks for {distributed_type}, which shards it; use "
            "recipes/accelerate/ddp.yaml (with LoRA for large models) for this stage. DPO and MM-DPO "
            "(train.method) run under FSDP and DeepSpeed ZeRO."
        )


def make_accelerator(settings: ComputeSettings = ComputeSettings(), loop: str = "training", **kwargs) -> Accelerator:
    """The accelerator of a hand-written loop (named `loop` in errors): gloo processes on CPUs, NCCL on
    GPUs, DDP only (`require_replicated`), precision as `settings` say."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision = settings.precision()
    # accelerate keeps one state per process and refuses another precision in it; a stage that asks
    # for one (a later stage of the same `alignkit run`, a test) starts a fresh state in the same
    # process group.
    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision, **kwargs)
    require_replicated(accelerator.distributed_type.value, loop)
    return accelerator
