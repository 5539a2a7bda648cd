"""Moved to `alignkit.models.device` (below every stage, so the reward model's loops can use it too
without an import cycle between `reward` and `train`); this name stays for the training loops'
imports until they are updated."""

from alignkit.models.device import make_accelerator, mixed_precision, model_dtype, process_state

__all__ = ["make_accelerator", "mixed_precision", "model_dtype", "process_state"]
