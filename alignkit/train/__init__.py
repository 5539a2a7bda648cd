"""Training stages: DPO / MM-DPO, PPO / GRPO and SFT on a vision-language policy.

Models (loading, LoRA, merging) come from `alignkit.models`; the pairs file becomes a dataset in
`alignkit.data.preference`.
"""

from alignkit.train.dpo import train_dpo

__all__ = ["train_dpo"]
