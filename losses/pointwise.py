"""Pointwise re-ranking loss: cross-entropy of the answer token ("Yes" / "No"), AuroLA-rerank's loss."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from losses.base import LossOutput
from losses.rerank import RerankLoss, RerankScores


class PointwiseYesNo(RerankLoss):
    """Each (query, candidate) pair on its own: the answer token is "Yes" for the positive and "No"
    for a hard negative, and the loss is its cross-entropy.

    With ``over="vocabulary"`` the cross-entropy is the language model's own next-token loss over the
    whole vocabulary, as AuroLA trains its re-ranker (an LM loss on the answer token); with
    ``over="yes_no"`` it is restricted to the two answer tokens, which is what the score
    ``p = softmax(logit_Yes, logit_No)[Yes]`` reads.

    Logs ``accuracy`` (share of pairs whose p is on the right side of 0.5) and ``p_positive`` /
    ``p_negative`` (mean p of each kind).

    Args:
        over: ``"vocabulary"`` (AuroLA) or ``"yes_no"``.

    References:
        AuroLA: arXiv 2602.18010 (code: github.com/Jazzcharles/AuroLA).
        Nogueira et al., "Document Ranking with a Pretrained Sequence-to-Sequence Model" (monoT5), 2020.

    Example:
        >>> import torch
        >>> from losses.rerank import RerankScores
        >>> scores = RerankScores(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([3.0, 3.0]), 2)
        >>> round(PointwiseYesNo(over="yes_no")(scores).logs["accuracy"].item(), 2)
        1.0
    """

    def __init__(self, over: Literal["vocabulary", "yes_no"] = "vocabulary"):
        super().__init__()
        if over not in ("vocabulary", "yes_no"):
            raise ValueError(f"over must be 'vocabulary' or 'yes_no', got {over!r}")
        self.over = over

    def compute(self, scores: RerankScores) -> LossOutput:
        labels = scores.labels
        # column 0 is "Yes" (the positive's answer), column 1 "No"
        answer = scores.yes_no.gather(1, (1 - labels)[:, None]).squeeze(1)
        if self.over == "vocabulary":
            loss = (scores.log_normaliser - answer).mean()
        else:
            loss = F.cross_entropy(scores.yes_no, 1 - labels)
        with torch.no_grad():
            p = torch.sigmoid(scores.match_logit())
            positive = labels.bool()
            logs = {
                "accuracy": ((p > 0.5) == positive).float().mean(),
                "p_positive": p[positive].mean(),
                "p_negative": p[~positive].mean() if (~positive).any() else p.new_tensor(float("nan")),
            }
        return LossOutput(loss, logs)
