"""InfoNCE with in-batch negatives, optionally with several positives per anchor."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal

import torch
import torch.nn.functional as F

from losses.base import SimilarityLoss
from losses.structure import Direction, Structure


class InfoNCE(SimilarityLoss):
    """InfoNCE (a.k.a. NT-Xent / CLIP loss) over in-batch negatives.

    With logits ``s / τ`` (``s = q dᵀ``) the loss of an anchor is the cross-entropy against its own
    pair: rows for query→document, columns for document→query; ``directions="both"`` averages the
    two (the symmetric CLIP loss).

    Extra positives are candidates that match the anchor although they are not its pair: same
    clip id, identical document text, or an explicit ``positive_mask``. With ``positives``:

    - ``"none"``: they stay negatives (plain InfoNCE).
    - ``"multi"``: the numerator is the log-sum-exp over the pair and all extra positives
      (−log of the softmax mass on the positive set; MIL-NCE style).
    - ``"mask"``: they are removed from the denominator; the numerator stays the pair.

    τ is 0.05 in AuroLA, 0.07 in Omni-Embed-Audio, learnable in ALM2Vec and CLIP.

    Args:
        positives: treatment of extra positives: ``"none"``, ``"multi"`` or ``"mask"``.
        **kwargs: the :class:`~losses.base.SimilarityLoss` settings (temperature, directions,
            masker, gather, ...).

    References:
        van den Oord et al., "Representation Learning with Contrastive Predictive Coding", 2018.
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", 2021.
        Miech et al., "End-to-End Learning of Visual Representations from Uncurated Instructional
        Videos" (MIL-NCE), 2020.

    Example:
        >>> import torch
        >>> from losses import BatchInfo
        >>> loss = InfoNCE(temperature=0.07, positives="multi")
        >>> q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
        >>> d = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
        >>> out = loss(q, d, BatchInfo(clip_index=torch.tensor([0, 0, 1, 2])))
        >>> out.loss.shape, sorted(out.logs)[:3]
        (torch.Size([]), ['extra_positives', 'loss_d2q', 'loss_q2d'])
    """

    def __init__(self, positives: Literal["none", "multi", "mask"] = "none", **kwargs: Any):
        super().__init__(**kwargs)
        if positives not in ("none", "multi", "mask"):
            raise ValueError(f"positives must be 'none', 'multi' or 'mask', got {positives!r}")
        self.positives = positives

    def check_structure(self, present: Collection[str]) -> None:
        if self.positives != "none" and not {"clip_index", "texts", "positive_mask"} & set(present):
            raise ValueError(
                f"InfoNCE(positives={self.positives!r}) needs `clip_index`, `texts` or `positive_mask` in the BatchInfo"
            )

    def extra_positives(self, structure: Structure) -> torch.Tensor | None:
        if self.positives == "none":
            return None
        positives = structure.duplicates()
        if structure.positive_mask is not None:
            positives = structure.positive_mask if positives is None else positives | structure.positive_mask
        return positives

    def compute(self, direction: Direction) -> torch.Tensor:
        logits = direction.masked_logits()
        if direction.positives is None:
            return F.cross_entropy(logits, direction.targets, reduction="none")
        if self.positives == "mask":
            return F.cross_entropy(
                logits.masked_fill(direction.positives, float("-inf")), direction.targets, reduction="none"
            )
        positive_set = direction.positives | direction.target_mask()
        numerator = torch.logsumexp(logits.masked_fill(~positive_set, float("-inf")), 1)
        return torch.logsumexp(logits, 1) - numerator
