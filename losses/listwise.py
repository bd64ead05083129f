"""Listwise re-ranking loss: a softmax over each query's positive and its hard negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.base import LossOutput
from losses.rerank import RerankLoss, RerankScores


class ListwiseSoftmax(RerankLoss):
    """Each query's candidates compete: with the match log-odds ``z = logit_Yes − logit_No`` of its
    positive and ``n`` hard negatives, the loss is the cross-entropy of ``softmax(z / τ)`` against the
    positive (a localised contrastive estimation over the re-ranker's own scores).

    Beyond AuroLA, which trains pointwise: the listwise objective compares candidates of the same
    query, which is what re-ranking asks of the scores, and it leaves the scale of ``z`` (hence of p)
    free. Needs at least one negative per query. Logs ``accuracy`` (share of groups whose positive
    scores highest).

    Args:
        temperature: τ dividing the log-odds.
        pointwise_weight: weight of an added two-way pointwise cross-entropy that keeps p calibrated
            around 0.5 (0 for the pure listwise loss).

    References:
        Gao et al., "Rethink Training of BERT Rerankers in Multi-Stage Retrieval Pipeline" (LCE), 2021.

    Example:
        >>> import torch
        >>> from losses.rerank import RerankScores
        >>> scores = RerankScores(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([3.0, 3.0]), 2)
        >>> ListwiseSoftmax()(scores).logs["accuracy"].item()
        1.0
    """

    def __init__(self, temperature: float = 1.0, pointwise_weight: float = 0.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if pointwise_weight < 0:
            raise ValueError(f"pointwise_weight must be non-negative, got {pointwise_weight}")
        self.temperature = temperature
        self.pointwise_weight = pointwise_weight

    def compute(self, scores: RerankScores) -> LossOutput:
        if scores.group_size < 2:
            raise ValueError("ListwiseSoftmax needs at least one negative per query (num_negatives >= 1)")
        groups = (scores.match_logit() / self.temperature).view(-1, scores.group_size)
        target = torch.zeros(groups.shape[0], dtype=torch.long, device=groups.device)
        loss = F.cross_entropy(groups, target)
        if self.pointwise_weight:
            loss = loss + self.pointwise_weight * F.cross_entropy(scores.yes_no, 1 - scores.labels)
        with torch.no_grad():
            accuracy = (groups.argmax(1) == 0).float().mean()
        return LossOutput(loss, {"accuracy": accuracy})
