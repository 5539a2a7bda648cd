"""The critique reward model's training loss (MM-RLHF): critique cross-entropy plus pairwise terms.

    total = critique_weight * CE(critique tokens)
          + mean over untied pairs of  -log sigmoid(r_c - r_r - margin_weight * m)      (Bradley-Terry)
          + tie_weight    * mean over tied pairs (m == 0) of (r_c - r_r)^2               (ties)
          + center_weight * mean over all pairs of (r_c + r_r)^2                        (centering)

The centering term is TRL's `center_rewards_coefficient` term; it keeps scores near zero so they
can be compared across prompts and used as margins. A mean over an empty set is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms; the defaults follow the MM-RLHF recipe (centering 0.01)."""

    critique: float = 1.0
    margin: float = 0.0
    """Scale of the judge margin subtracted inside Bradley-Terry (0: the plain loss)."""
    tie: float = 1.0
    """Only acts on tied pairs (margin 0); alignkit's pair builder never makes them."""
    center: float = 0.01


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Per pair: -log sigmoid(r_chosen - r_rejected - margin)."""
    return -F.logsigmoid(r_chosen - r_rejected - margin)


def tie_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per pair: (r_chosen - r_rejected)^2, pulling the scores of equally good answers together."""
    return (r_chosen - r_rejected) ** 2


def centering_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """mean((r_chosen + r_rejected)^2), as TRL's RewardTrainer computes it."""
    return torch.mean((r_chosen + r_rejected) ** 2)


def critique_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy over all critique tokens of the batch (0 when there are none)."""
    if targets.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets)


def _mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask].mean() if mask.any() else x.sum() * 0.0


def reward_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margins: torch.Tensor,
    critique_logits: torch.Tensor,
    critique_targets: torch.Tensor,
    weights: LossWeights = LossWeights(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss and its parts (see the module docstring)."""
    tied = margins == 0
    bt = _mean(bradley_terry_loss(r_chosen, r_rejected, weights.margin * margins), ~tied)
    tie = _mean(tie_loss(r_chosen, r_rejected), tied)
    center = centering_loss(r_chosen, r_rejected)
    ce = critique_loss(critique_logits, critique_targets)
    total = weights.critique * ce + bt + weights.tie * tie + weights.center * center
    parts = {"loss": total, "bradley_terry": bt, "tie": tie, "center": center, "critique_ce": ce}
    return total, {k: v.item() for k, v in parts.items()}
