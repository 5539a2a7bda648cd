"""Training stages: DPO with LoRA on a vision-language policy."""

from alignkit.train.data import load_preference_dataset
from alignkit.train.dpo import train_dpo
from alignkit.train.model import DEFAULT_TARGET_MODULES, load_policy, lora_config

__all__ = ["DEFAULT_TARGET_MODULES", "load_policy", "load_preference_dataset", "lora_config", "train_dpo"]
