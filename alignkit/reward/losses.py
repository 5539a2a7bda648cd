"""The critique reward model's training loss (MM-RLHF): critique cross-entropy plus pairwise terms.

    total = critique_weight * CE(critique tokens)
          + mean over untied pairs of  -log sigmoid(r_c - r_r - margin_weight * m)      (Bradley-Terry)
          + tie_weight    * mean over tied pairs (m == 0) of (r_c - r_r)^2               (ties)
          + center_weight * mean over all pairs of (r_c + r_r)^2                        (centering)

The centering term is TRL's `center_rewards_coefficient` term; it keeps scores near zero so they
can be compared across prompts and used as margins. A mean over an empty set is 0.

Every mean is a sum divided by a count (`LossCounts`). A part of a batch (one process's slice, one
micro-batch) divides its sums by the counts of the whole batch, so the parts' losses add up to the
whole batch's loss, and their gradients to its gradient.
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


@dataclass(frozen=True)
class LossCounts:
    """The denominators of the loss's means: pairs, untied and tied pairs, critique tokens."""

    pairs: int
    untied: int
    tied: int
    critique_tokens: int

    @classmethod
    def of(cls, margins: torch.Tensor | list[float], critique_tokens: int) -> LossCounts:
        """The counts of a batch of pairs with these judge margins and this many critique tokens."""
        tied = sum(float(m) == 0 for m in margins)
        return cls(len(margins), len(margins) - tied, tied, critique_tokens)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Per pair: -log sigmoid(r_chosen - r_rejected - margin)."""
    return -F.logsigmoid(r_chosen - r_rejected - margin)


def tie_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per pair: (r_chosen - r_rejected)^2, pulling the scores of equally good answers together."""
    return (r_chosen - r_rejected) ** 2


def centering_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per pair: (r_chosen + r_rejected)^2; its mean is TRL's RewardTrainer centering term."""
    return (r_chosen + r_rejected) ** 2


def critique_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the critique tokens (0, still in the graph, when there are none)."""
    if targets.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _mean(x: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """The sum of x over mask divided by count: a mean over the batch that counted `count` (0: 0)."""
    return x[mask].sum() / max(count, 1)


def reward_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margins: torch.Tensor,
    critique_logits: torch.Tensor,
    critique_targets: torch.Tensor,
    weights: LossWeights = LossWeights(),
    counts: LossCounts | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss and its parts (see the module docstring), its means taken over `counts`
    (default: this batch's own counts; a part of a bigger batch passes the bigger batch's)."""
    tied = margins == 0
    counts = counts or LossCounts.of(margins.tolist(), critique_targets.numel())
    bt = _mean(bradley_terry_loss(r_chosen, r_rejected, weights.margin * margins), ~tied, counts.untied)
    tie = _mean(tie_loss(r_chosen, r_rejected), tied, counts.tied)
    center = _mean(centering_loss(r_chosen, r_rejected), torch.ones_like(tied), counts.pairs)
    ce = critique_loss(critique_logits, critique_targets) / max(counts.critique_tokens, 1)
    total = weights.critique * ce + bt + weights.tie * tie + weights.center * center
    parts = {"loss": total, "bradley_terry": bt, "tie": tie, "center": center, "critique_ce": ce}
    return total, {k: v.item() for k, v in parts.items()}
