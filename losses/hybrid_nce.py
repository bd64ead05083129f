"""Hybrid-NCE (AuroLA): weighted multi-positives plus importance-weighted hard negatives."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import torch

from losses.base import SimilarityLoss, masked_logsumexp
from losses.structure import Direction, Structure, string_key


class HybridNCE(SimilarityLoss):
    """Hybrid-NCE: multi-positive InfoNCE with hard-negative importance weights.

    For an anchor ``i`` with logits ``l_ij = s_ij / τ`` and ``e_ij = exp(l_ij)``:

    - positives ``P_i``: the pair (weight ``w⁺ = 1``) and the extra positives (weight ``λ``);
    - negatives ``N_i``: every other candidate not dropped by a masker, with importance weights
      ``w⁻_ij = |N_i| · exp(β l_ij) / Σ_{k∈N_i} exp(β l_ik)`` (mean 1; ``β = 0`` gives plain
      negatives, larger ``β`` up-weights the hard ones);
    - ``L_i = −log[ Σ_P w⁺ e / (α Σ_P w⁺ e + Σ_N w⁻ e) ]``.

    ``α < 1`` shrinks the positives' share of the denominator (``α = 0`` is the decoupled loss of
    Yeh et al.); ``α = 1, β = 0`` with no extra positives is InfoNCE, and with extra positives
    it is ``InfoNCE(positives="mask")`` for ``λ = 0`` and ``InfoNCE(positives="multi")`` for
    ``λ = 1``. Everything is evaluated in log space: ``log Σ_N w⁻ e = log|N_i| +
    LSE_N((1+β) l) − LSE_N(β l)``.

    Extra positives: rows ``i`` and ``j`` whose tag-cluster sets (``tag_clusters``) are identical
    and non-empty, plus duplicates (same ``clip_ids`` or identical ``texts``) and an explicit
    ``positive_mask``. With ``positives_only_for_tags`` a row's tag clusters count only when its
    sampled caption kind (``caption_kinds``) is ``"tags"``, as in AuroLA, where rows that sampled a
    long or short caption carry an empty cluster set.

    Gradient through the negative weights: by default ``w⁻`` is part of the graph, i.e. the loss
    is differentiated exactly as the formula is written, as AuroLA's code and HCL's reference
    code do. ``detach_weights=True`` treats ``w⁻`` as constants (pure importance reweighting of
    the InfoNCE gradient); the loss value is the same.

    Deliberate differences from AuroLA's code:

    - Both directions are available and correct: document→query (text→audio when queries are
      audio) normalises over *columns*; AuroLA's text→audio branch reuses the row sums of the
      positives, and AuroLA trains audio→text only. The default here is ``"both"``.
    - Tags without a cluster entry keep their own identity (see :class:`losses.TagClusterMap`);
      AuroLA drops them, so two rows whose only tags are unmapped never match there.
    - Duplicates and ``positive_mask`` also count as (λ-weighted) extra positives.
    - No ``1e-8`` guards; log-space evaluation keeps float32 stable instead.

    τ is 0.05 in AuroLA.

    Args:
        alpha: weight of the positives in the denominator (AuroLA's default 1.0).
        lam: weight λ of the extra positives in numerator and denominator (AuroLA's default 1.0).
        beta: hardness β of the negative weights (AuroLA's default 0.1).
        positives_only_for_tags: tag clusters count only for rows whose caption kind is "tags".
        detach_weights: stop the gradient through the negative weights ``w⁻``.
        **kwargs: the :class:`~losses.base.SimilarityLoss` settings (temperature, directions,
            masker (dropped candidates leave ``N_i``), gather, ...).

    References:
        AuroLA: arXiv 2602.18010 (code: github.com/Jazzcharles/AuroLA).
        Radenovic et al., "Filtering, Distillation, and Hard Negatives for Vision-Language
        Pre-Training" (HN-NCE), 2023.
        Robinson et al., "Contrastive Learning with Hard Negative Samples" (HCL), 2021.
        Yeh et al., "Decoupled Contrastive Learning", 2022.

    Example:
        >>> import torch
        >>> from losses import BatchInfo
        >>> loss = HybridNCE(alpha=0.5, beta=0.1, lam=1.0)
        >>> q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
        >>> d = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
        >>> out = loss(q, d, BatchInfo(tag_clusters=[{1, 2}, {1, 2}, set(), {3}],
        ...            caption_kinds=["tags", "tags", "long", "tags"]))
        >>> out.logs["extra_positives"].item()
        0.5
    """

    def __init__(
        self,
        alpha: float = 1.0,
        lam: float = 1.0,
        beta: float = 0.1,
        positives_only_for_tags: bool = True,
        detach_weights: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        for name, value in (("alpha", alpha), ("lam", lam), ("beta", beta)):
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        self.alpha = alpha
        self.lam = lam
        self.beta = beta
        self.positives_only_for_tags = positives_only_for_tags
        self.detach_weights = detach_weights

    def check_structure(self, present: Collection[str]) -> None:
        if self.positives_only_for_tags and "tag_clusters" in present and "caption_kinds" not in present:
            raise ValueError(
                "HybridNCE(positives_only_for_tags=True) needs `caption_kinds` alongside `tag_clusters`"
            )

    def extra_positives(self, structure: Structure) -> torch.Tensor | None:
        positives = structure.duplicates()
        if structure.positive_mask is not None:
            positives = structure.positive_mask if positives is None else positives | structure.positive_mask
        if structure.tag_keys is not None:
            keys = structure.tag_keys
            has_tags = keys != 0
            if self.positives_only_for_tags:
                has_tags &= structure.kind_keys == string_key("tags")
            pairs = structure.size  # query rows against every document (the extras have no tags)
            same = (keys[:pairs, None] == keys[None, :]) & has_tags[:pairs, None] & has_tags[None, :]
            positives = same if positives is None else positives | same
        return positives

    def compute(self, direction: Direction) -> torch.Tensor:
        logits = direction.logits
        target = direction.target_mask()
        positive_set = target
        log_weights = torch.zeros_like(logits)
        if direction.positives is not None and self.lam > 0:
            positive_set = target | direction.positives
            log_weights = log_weights.masked_fill(direction.positives, math.log(self.lam))
        log_positive = masked_logsumexp(logits + log_weights, positive_set)

        negatives = direction.negatives()
        has_negatives = negatives.any(1)
        log_count = negatives.sum(1).clamp(min=1).to(logits.dtype).log()
        if self.detach_weights:
            with torch.no_grad():
                log_normaliser = masked_logsumexp(self.beta * logits, negatives)
                log_w = log_count[:, None] + self.beta * logits - log_normaliser[:, None]
            log_negative = masked_logsumexp(logits + log_w, negatives)
        else:
            log_negative = (
                log_count
                + masked_logsumexp((1 + self.beta) * logits, negatives)
                - masked_logsumexp(self.beta * logits, negatives)
            )
        # -inf - -inf above is NaN for rows without negatives; their negative sum is 0.
        log_negative = log_negative.masked_fill(~has_negatives, float("-inf"))

        if self.alpha == 0:
            # Without negatives the decoupled loss has nothing to contrast: such rows add 0.
            return (log_negative - log_positive).masked_fill(~has_negatives, 0.0)
        log_denominator = torch.logaddexp(log_positive + math.log(self.alpha), log_negative)
        return log_denominator - log_positive
