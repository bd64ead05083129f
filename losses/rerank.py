"""Shared contract of the re-ranking losses: answer-token logits of groups of (query, candidate) pairs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from losses.base import LossOutput


@dataclass
class RerankScores:
    """What a re-ranker read at the answer position of each (query, candidate) prompt.

    Pairs come in groups of ``group_size``: one query with its positive candidate first, then its
    hard negatives, so pair ``g * group_size`` is group ``g``'s positive.

    Attributes:
        yes_no: ``(N, 2)`` float32 logits of the "Yes" and "No" tokens.
        log_normaliser: ``(N,)`` log-sum-exp of the logits over the whole vocabulary (the language
            model's own softmax), for losses on the vocabulary distribution.
        group_size: pairs per group (1 + negatives per query).
    """

    yes_no: torch.Tensor
    log_normaliser: torch.Tensor
    group_size: int

    def __post_init__(self) -> None:
        n = self.yes_no.shape[0]
        if self.yes_no.ndim != 2 or self.yes_no.shape[1] != 2:
            raise ValueError(f"yes_no must be (N, 2), got {tuple(self.yes_no.shape)}")
        if tuple(self.log_normaliser.shape) != (n,):
            raise ValueError(f"log_normaliser must be ({n},), got {tuple(self.log_normaliser.shape)}")
        if self.group_size < 1 or n % self.group_size:
            raise ValueError(f"{n} pairs do not split into groups of {self.group_size}")

    @property
    def labels(self) -> torch.Tensor:
        """``(N,)`` 1 for each group's positive, 0 for its negatives."""
        n = self.yes_no.shape[0]
        return (torch.arange(n, device=self.yes_no.device) % self.group_size == 0).long()

    def match_logit(self) -> torch.Tensor:
        """``(N,)`` log-odds of "Yes" against "No": the score the re-ranker's p = sigmoid of."""
        return self.yes_no[:, 0] - self.yes_no[:, 1]


class RerankLoss(nn.Module):
    """Base of the re-ranking losses: ``loss(scores: RerankScores) -> LossOutput``, computed with
    autocast off in float32. Subclasses implement :meth:`compute`."""

    def forward(self, scores: RerankScores) -> LossOutput:
        with torch.autocast(scores.yes_no.device.type, enabled=False):
            return self.compute(RerankScores(scores.yes_no.float(), scores.log_normaliser.float(), scores.group_size))

    def compute(self, scores: RerankScores) -> LossOutput:
        raise NotImplementedError
