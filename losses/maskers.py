"""False-negative maskers: rules that remove suspected false negatives from the denominators.

A masker looks at one :class:`~losses.structure.Direction` (anchors × candidates) and returns a
boolean (A, C) matrix of candidates to drop, never an anchor's own pair. The loss also keeps its
extra positives out of it, so a masker never touches a positive, and sets the logits of the rest
to -inf before the softmax (and leaves them out of any negative count). Any loss derived from
:class:`~losses.base.SimilarityLoss` accepts one masker or a list (their drops are OR-ed) and logs
``masked_fraction``, the fraction of off-target entries removed.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from losses.structure import Direction, Structure


class FalseNegativeMasker(nn.Module):
    """Base class: subclasses implement :meth:`rule`; calling the masker gives the (A, C) drop matrix.

    The drop matrix never contains an anchor's own pair, whatever the rule says.
    """

    def check_structure(self, present: Collection[str]) -> None:
        """Raise a ``ValueError`` when a structure argument this masker needs is missing."""

    def rule(self, direction: Direction, structure: Structure) -> torch.Tensor:
        """(A, C) candidates the rule considers false negatives."""
        raise NotImplementedError

    def forward(self, direction: Direction, structure: Structure) -> torch.Tensor:
        return self.rule(direction, structure) & ~direction.target_mask()


class MarginMasker(FalseNegativeMasker):
    """Drop negative ``j`` of anchor ``i`` when ``s_ij > s_ii + margin``.

    A candidate scored clearly above the anchor's own pair is more likely an unlabelled positive
    than a hard negative. The rule is applied per direction: over rows (the query's documents) for
    query→document and over columns (the document's queries) for document→query. ``s_ii`` is taken
    without gradient; the decision is a boolean anyway.

    Args:
        margin: how far above the positive's similarity a negative must score to be dropped
            (cosine units; 0.1 in Qwen3-Embedding).

    References:
        Zhang et al., "Qwen3 Embedding: Advancing Text Embedding and Reranking Through Foundation
        Models", 2025 (and the ms-swift implementation of its loss).

    Example:
        >>> from losses import InfoNCE
        >>> loss = InfoNCE(masker=MarginMasker(margin=0.1))
    """

    def __init__(self, margin: float = 0.1):
        super().__init__()
        self.margin = margin

    @torch.no_grad()
    def rule(self, direction: Direction, structure: Structure) -> torch.Tensor:
        positive = direction.scores.gather(1, direction.targets[:, None])
        return direction.scores > positive + self.margin


class DuplicateMasker(FalseNegativeMasker):
    """Drop candidates that are the same item as the anchor: same clip id or identical text.

    With several captions of one clip in a batch, or the same caption attached to two clips, the
    "negative" is a true match. Uses ``clip_ids`` and/or ``texts`` (whichever is given; at least
    one is required).

    References:
        sentence-transformers' ``NoDuplicatesBatchSampler`` avoids the same false negatives at
        sampling time (Reimers and Gurevych, "Sentence-BERT", 2019, and its library); masking
        handles them when the sampler cannot (several captions per clip, gathered batches).

    Example:
        >>> import torch
        >>> from losses import BatchInfo, InfoNCE
        >>> q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
        >>> out = InfoNCE(masker=DuplicateMasker())(q, q, BatchInfo(clip_index=torch.tensor([0, 0, 1, 2])))
        >>> round(out.logs["masked_fraction"].item(), 4)
        0.1667
    """

    def check_structure(self, present: Collection[str]) -> None:
        if "clip_index" not in present and "texts" not in present:
            raise ValueError("DuplicateMasker needs `clip_index` or `texts` in the BatchInfo")

    def rule(self, direction: Direction, structure: Structure) -> torch.Tensor:
        drop = torch.zeros_like(direction.scores, dtype=torch.bool)
        for keys in (structure.clip_ids, structure.text_keys):
            if keys is not None:
                drop |= direction.same(keys)
        return drop


class GuideModelMasker(FalseNegativeMasker):
    """Drop negative ``j`` of anchor ``i`` when a frozen guide model scores ``g_ij > g_ii − margin``.

    The guide (e.g. a strong off-the-shelf embedder) sees the pairs independently of the model
    being trained, so its judgement does not drift with training. Needs ``guide_scores``, the
    guide's (B, B) query×document similarities; the rule uses rows for query→document and
    columns for document→query.

    When gathering across processes only within-process guide scores are known: cross-process
    pairs are never dropped by this rule.

    Args:
        margin: slack below the guide's score of the true pair (0.1 by default; GIST uses the
            guide's positive score as the threshold, i.e. margin 0).

    References:
        Solatorio, "GISTEmbed: Guided In-sample Selection of Training Negatives for Text
        Embedding Fine-tuning", 2024.

    Example:
        >>> import torch
        >>> from losses import BatchInfo, InfoNCE
        >>> q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
        >>> out = InfoNCE(masker=GuideModelMasker(0.1))(q, q, BatchInfo(guide_scores=q @ q.T))
        >>> "masked_fraction" in out.logs
        True
    """

    def __init__(self, margin: float = 0.1):
        super().__init__()
        self.margin = margin

    def check_structure(self, present: Collection[str]) -> None:
        if "guide_scores" not in present:
            raise ValueError("GuideModelMasker needs `guide_scores` in the BatchInfo")

    @torch.no_grad()
    def rule(self, direction: Direction, structure: Structure) -> torch.Tensor:
        guide = direction.view(structure.guide_scores)
        positive = guide.gather(1, direction.targets[:, None])
        return guide > positive - self.margin
