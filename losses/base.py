"""Shared contract of the contrastive losses: validation, temperature, directions, masking, logs.

A loss is called as ``loss(query, document, **structure) -> LossOutput``. ``query`` and ``document``
are (B, D) L2-normalised embeddings whose row ``i`` is a true pair. ``structure`` is optional batch
information; each loss uses what it needs and ignores the rest:

- ``clip_ids``: LongTensor (B,), the clip of each pair (several captions of one clip share it).
- ``texts``: list of B document texts (identical texts are the same item).
- ``positive_mask``: BoolTensor (B, B), extra (query, document) positives.
- ``tag_clusters``: list of B sets of tag-cluster ids (see :class:`losses.TagClusterMap`).
- ``caption_kinds``: list of B strings, which caption was sampled ("long", "short", "tags", ...).
- ``guide_scores``: Tensor (B, B), a frozen guide model's query×document similarities.

All input checking lives here, so every loss rejects bad input with the same messages.

Similarities are computed in float32 (whatever the embeddings' precision), or in float64 when the
embeddings are float64, which the tests use to compare against float64 references.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from losses.distributed import GatheredBatch, GatherMode, gather_batch
from losses.maskers import FalseNegativeMasker
from losses.structure import Direction, Structure

STRUCTURE_KEYS = ("clip_ids", "texts", "positive_mask", "tag_clusters", "caption_kinds", "guide_scores")


@dataclass
class LossOutput:
    """A scalar loss plus detached scalars to log (keys without a stage prefix)."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class Temperature(nn.Module):
    """Softmax temperature τ, fixed or learnable.

    A learnable τ is stored as the log of the logit scale 1/τ (as in CLIP). The stored value is
    clamped in place to 1/τ ≤ ``max_logit_scale`` each time it is read, as open_clip clamps after
    each step: a clamp inside the graph would give zero gradient past the bound and could leave τ
    stuck there.

    Args:
        init: initial τ.
        learnable: train τ with the model.
        max_logit_scale: upper bound on 1/τ.
    """

    def __init__(self, init: float = 0.05, learnable: bool = False, max_logit_scale: float = 100.0):
        super().__init__()
        if init <= 0:
            raise ValueError(f"temperature must be positive, got {init}")
        if 1.0 / init > max_logit_scale:
            raise ValueError(f"initial temperature {init} gives 1/τ above max_logit_scale {max_logit_scale}")
        log_scale = torch.tensor(math.log(1.0 / init), dtype=torch.float32)
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.max_log_scale = math.log(max_logit_scale)

    def scale(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The logit scale 1/τ as a scalar of ``dtype`` (gradient flows when learnable)."""
        with torch.no_grad():
            self.log_scale.clamp_(max=self.max_log_scale)
        return self.log_scale.to(dtype).exp()

    def forward(self) -> torch.Tensor:
        return 1.0 / self.scale()


def _check_embeddings(query: Any, document: Any) -> None:
    for name, x in (("query", query), ("document", document)):
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            raise ValueError(f"{name} embeddings must be a 2-D tensor (B, D), got {getattr(x, 'shape', type(x))}")
        if not x.is_floating_point():
            raise TypeError(f"{name} embeddings must be floating point, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} embeddings contain NaN or Inf")
    if query.shape != document.shape:
        raise ValueError(f"query shape {tuple(query.shape)} != document shape {tuple(document.shape)}")
    if query.dtype != document.dtype:
        raise TypeError(f"query dtype {query.dtype} != document dtype {document.dtype}")


def check_positive_mask(mask: Any, rows: int, cols: int, name: str = "positive_mask") -> None:
    """Raise unless ``mask`` is ``None`` or a ``rows × cols`` boolean tensor."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (rows, cols):
        raise ValueError(
            f"{name} must be a boolean tensor of shape ({rows}, {cols}), got "
            f"{getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}"
        )


def _check_list(name: str, value: Any, batch: int, item_ok, item_doc: str) -> None:
    if not isinstance(value, (list, tuple)) or len(value) != batch:
        length = len(value) if hasattr(value, "__len__") else "?"
        raise ValueError(f"{name} must be a list of {batch} {item_doc}, got {type(value).__name__} of length {length}")
    for i, item in enumerate(value):
        if not item_ok(item):
            raise TypeError(f"{name}[{i}] must be {item_doc}, got {item!r}")


def _is_cluster_set(item: Any) -> bool:
    return isinstance(item, (set, frozenset)) and all(isinstance(c, int) and not isinstance(c, bool) for c in item)


def validate_inputs(query: Any, document: Any, structure: dict[str, Any]) -> None:
    """Raise a ``ValueError``/``TypeError`` naming the offending argument if anything is malformed."""
    _check_embeddings(query, document)
    unknown = sorted(set(structure) - set(STRUCTURE_KEYS))
    if unknown:
        raise TypeError(f"unknown structure argument(s) {unknown}; expected some of {list(STRUCTURE_KEYS)}")
    batch = query.shape[0]
    clip_ids = structure.get("clip_ids")
    if clip_ids is not None:
        if (
            not isinstance(clip_ids, torch.Tensor)
            or clip_ids.is_floating_point()
            or clip_ids.is_complex()
            or clip_ids.dtype == torch.bool
            or tuple(clip_ids.shape) != (batch,)
        ):
            raise ValueError(
                f"clip_ids must be an integer tensor of shape ({batch},), got "
                f"{getattr(clip_ids, 'dtype', type(clip_ids))} {tuple(getattr(clip_ids, 'shape', ()))}"
            )
    if structure.get("texts") is not None:
        _check_list("texts", structure["texts"], batch, lambda t: isinstance(t, str), "strings")
    if structure.get("caption_kinds") is not None:
        _check_list("caption_kinds", structure["caption_kinds"], batch, lambda t: isinstance(t, str), "strings")
    if structure.get("tag_clusters") is not None:
        _check_list("tag_clusters", structure["tag_clusters"], batch, _is_cluster_set, "sets of int cluster ids")
    check_positive_mask(structure.get("positive_mask"), batch, batch)
    guide = structure.get("guide_scores")
    if guide is not None:
        if not isinstance(guide, torch.Tensor) or not guide.is_floating_point() or tuple(guide.shape) != (batch, batch):
            raise ValueError(
                f"guide_scores must be a floating-point tensor of shape ({batch}, {batch}), got "
                f"{getattr(guide, 'dtype', type(guide))} {tuple(getattr(guide, 'shape', ()))}"
            )
        if torch.isnan(guide).any():
            raise ValueError("guide_scores contain NaN")


class ContrastiveLoss(nn.Module):
    """What the training module calls: ``loss(query, document, **structure) -> LossOutput``.

    See the module docstring for the structure arguments. Most losses derive from
    :class:`SimilarityLoss`; wrappers such as :class:`losses.Matryoshka` derive from this class.
    """

    def forward(self, query: torch.Tensor, document: torch.Tensor, **structure: Any) -> LossOutput:
        raise NotImplementedError


class SimilarityLoss(ContrastiveLoss):
    """Base of the losses computed from the query×document similarity matrix.

    The base validates the inputs, gathers across processes (``gather``), builds one
    :class:`~losses.structure.Direction` per retrieval direction (query→document uses the rows of
    ``s = q dᵀ``, document→query its columns), marks extra positives (:meth:`extra_positives`)
    and masked negatives (``masker``), and averages the directions. Subclasses implement
    :meth:`compute`, the per-anchor losses of one direction.

    Logs: ``temperature``; ``loss_q2d`` / ``loss_d2q``; ``sim_pos`` (mean similarity of the true
    pairs), ``sim_neg`` (mean similarity of the negatives) and ``sim_neg_max`` (mean over anchors
    of the hardest negative); ``masked_fraction`` (share of off-target entries dropped by the
    maskers) when there is a masker; ``extra_positives`` (mean number per anchor) when the loss
    uses extra positives. With ``gather="local"`` the logs describe this process's anchors.

    Args:
        temperature: initial softmax temperature τ.
        learnable_temperature: learn τ (stored as log 1/τ, clamped to 1/τ ≤ ``max_logit_scale``).
        max_logit_scale: upper bound on 1/τ.
        directions: ``"q2d"`` (query→document, rows), ``"d2q"`` (document→query, columns) or
            ``"both"`` (their mean).
        masker: false-negative masker(s) applied to every direction; several are OR-ed.
        gather: cross-process negatives, see :mod:`losses.distributed`: ``"none"``, ``"local"``
            (local anchors vs global candidates) or ``"global"`` (global vs global). A no-op
            outside distributed runs.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        max_logit_scale: float = 100.0,
        directions: Literal["q2d", "d2q", "both"] = "both",
        masker: FalseNegativeMasker | list[FalseNegativeMasker] | None = None,
        gather: GatherMode = "none",
    ):
        super().__init__()
        if directions not in ("q2d", "d2q", "both"):
            raise ValueError(f"directions must be 'q2d', 'd2q' or 'both', got {directions!r}")
        if gather not in ("none", "local", "global"):
            raise ValueError(f"gather must be 'none', 'local' or 'global', got {gather!r}")
        self.temperature = Temperature(temperature, learnable_temperature, max_logit_scale)
        self.directions = directions
        self.maskers = nn.ModuleList([] if masker is None else masker if isinstance(masker, list) else [masker])
        self.gather = gather

    def check_structure(self, present: Collection[str]) -> None:
        """Raise a ``ValueError`` when a structure argument this loss needs is missing."""

    def extra_positives(self, structure: Structure) -> torch.Tensor | None:
        """(N, N) query×document extra positives of the batch, or ``None`` when the loss uses none."""
        return None

    def compute(self, direction: Direction) -> torch.Tensor:
        """Per-anchor losses (A,) of one direction."""
        raise NotImplementedError

    def forward(self, query: torch.Tensor, document: torch.Tensor, **structure: Any) -> LossOutput:
        validate_inputs(query, document, structure)
        present = {key for key, value in structure.items() if value is not None}
        self.check_structure(present)
        for masker in self.maskers:
            masker.check_structure(present)
        dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        encoded = Structure.encode(query.shape[0], query.device, **structure)
        batch = gather_batch(query.to(dtype), document.to(dtype), encoded, self.gather)
        positives = self.extra_positives(batch.structure)

        losses, stats = {}, []
        for direction in self._directions(batch, positives, self.temperature.scale(dtype)):
            losses[f"loss_{direction.name}"] = self.compute(direction).sum() * batch.norm
            stats.append(self._stats(direction))
        loss = torch.stack(list(losses.values())).mean()

        logs = {key: value.detach() for key, value in losses.items()}
        logs["temperature"] = self.temperature().detach()
        for key in stats[0]:
            logs[key] = torch.stack([s[key] for s in stats]).mean()
        return LossOutput(loss, logs)

    def _directions(
        self, batch: GatheredBatch, positives: torch.Tensor | None, scale: torch.Tensor
    ) -> Iterator[Direction]:
        names = ("q2d", "d2q") if self.directions == "both" else (self.directions,)
        rows = batch.anchors
        targets = torch.arange(rows.start, rows.stop, device=batch.queries.device)
        # Anchors = all candidates: one matrix serves both directions (d2q reads its columns).
        full = rows.stop - rows.start == batch.structure.size
        shared = batch.queries @ batch.documents.T if full else None
        for name in names:
            if full:
                scores = shared if name == "q2d" else shared.T
            else:
                anchors, candidates = (
                    (batch.queries, batch.documents) if name == "q2d" else (batch.documents, batch.queries)
                )
                scores = anchors[rows] @ candidates.T
            direction = Direction(name, scores, scores * scale, targets)
            if positives is not None:
                direction.positives = direction.view(positives) & ~direction.target_mask()
            if len(self.maskers):
                drop = torch.stack([masker(direction, batch.structure) for masker in self.maskers]).any(0)
                if direction.positives is not None:
                    drop &= ~direction.positives
                direction.drop = drop
            yield direction

    @torch.no_grad()
    def _stats(self, direction: Direction) -> dict[str, torch.Tensor]:
        # Masked sums rather than boolean indexing, which would synchronise with the GPU.
        scores = direction.scores
        negatives = direction.negatives()
        has_negatives = negatives.any(1)
        hardest = scores.masked_fill(~negatives, float("-inf")).amax(1).masked_fill(~has_negatives, 0.0)
        stats = {
            "sim_pos": scores.gather(1, direction.targets[:, None]).mean(),
            "sim_neg": scores.masked_fill(~negatives, 0.0).sum() / negatives.sum().clamp(min=1),
            "sim_neg_max": hardest.sum() / has_negatives.sum().clamp(min=1),
        }
        if direction.drop is not None:
            stats["masked_fraction"] = direction.drop.sum() / max(scores.numel() - scores.shape[0], 1)
        if direction.positives is not None:
            stats["extra_positives"] = direction.positives.sum(1).float().mean()
        return stats


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log Σ_{j: mask} exp(x_ij); -inf for rows with an empty mask, with finite gradients.

    ``torch.logsumexp`` over a row of -inf has NaN gradients, which leak through any later
    ``where``; empty rows are therefore evaluated on zeros and their result overwritten.
    """
    empty = ~mask.any(1)
    safe = x.masked_fill(~mask, float("-inf")).masked_fill(empty[:, None], 0.0)
    return torch.logsumexp(safe, 1).masked_fill(empty, float("-inf"))
