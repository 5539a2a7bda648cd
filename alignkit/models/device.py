"""Device, precision and processes for the hand-written loops, from accelerate's state.

No loop picks a device or a dtype itself: accelerate places the model (`accelerator.device`: the
process's GPU under torchrun/accelerate launch, else the CPU) and runs the forward pass in mixed
precision. Weights stay float32; the compute is bf16 where the GPU supports it, fp32 on a CPU, or
what an accelerate config file asked for (`launch.config_file`, passed on by `accelerate launch`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState


def mixed_precision() -> str:
    """`bf16` on a GPU that supports it, `no` on a CPU; `accelerate launch --config_file` may set it."""
    if precision := os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def model_dtype() -> torch.dtype:
    """The dtype a TRL-trained policy is loaded in: bf16 where the compute is bf16, else float32
    (CPU, fp16 mixed precision, or an accelerate config without mixed precision)."""
    return torch.bfloat16 if mixed_precision() == "bf16" else torch.float32


def process_state() -> PartialState:
    """This process's place among the processes of a stage (one process, rank 0, outside a launch)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def make_accelerator(**kwargs) -> Accelerator:
    """The accelerator of a training loop: gloo processes on CPUs, NCCL on GPUs, precision as above."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(), **kwargs)
