"""The critique-based reward model (MM-RLHF): critique generation plus a scalar score head."""

from alignkit.reward.losses import LossWeights, reward_loss
from alignkit.reward.model import RewardModel, build_reward_model, load_reward_model
from alignkit.reward.score import Answer, evaluate_pairs, pairwise_accuracy, score_answers
from alignkit.reward.train import fit, train_reward_model

__all__ = [
    "Answer", "LossWeights", "RewardModel", "build_reward_model", "evaluate_pairs", "fit",
    "load_reward_model", "pairwise_accuracy", "reward_loss", "score_answers", "train_reward_model",
]  # fmt: skip
