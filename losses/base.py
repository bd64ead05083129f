"""Shared contract of the contrastive losses: validation, precision, temperature, directions, masking, logs.

A loss is called as ``loss(query, document, info=None) -> LossOutput``. ``query`` is (B, D) and
``document`` (B + M, D), L2-normalised, whose row ``i < B`` is a true pair; documents ``B ..`` are
extra negatives (M = 0 for plain pairs; hard negatives of text pairs otherwise): candidates of every
query in the query→document direction, never a target, never an anchor. ``info`` is an optional
:class:`~losses.structure.BatchInfo` (clip indices, texts, tag clusters, ...), built by the collator,
of which each loss uses what it needs.

All input checking lives in :meth:`ContrastiveLoss.forward`, so every loss rejects bad input with the
same messages. Losses compute with autocast disabled, on float32 inputs (float64 when the embeddings
are float64, which the tests use to compare against float64 references): under ``bf16-mixed``,
autocast would otherwise recast the similarity matmul to bfloat16 even after ``.float()``.
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
from losses.structure import BatchInfo, Direction, Structure


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
    if query.shape[1] != document.shape[1] or document.shape[0] < query.shape[0]:
        raise ValueError(
            f"query shape {tuple(query.shape)} and document shape {tuple(document.shape)} do not match: the "
            "documents need the queries' dimension and at least one row per query (row i is query i's pair, "
            "rows beyond the queries are extra negatives)"
        )
    if query.dtype != document.dtype:
        raise TypeError(f"query dtype {query.dtype} != document dtype {document.dtype}")


def validate_inputs(query: Any, document: Any, info: BatchInfo | None) -> None:
    """Raise a ``ValueError``/``TypeError`` naming the offending argument if anything is malformed."""
    _check_embeddings(query, document)
    if info is not None:
        if not isinstance(info, BatchInfo):
            raise TypeError(f"the loss's third argument must be a BatchInfo, got {type(info).__name__}")
        info.validate(query.shape[0], document.shape[0])


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 embeddings (reference tests), else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class ContrastiveLoss(nn.Module):
    """What the training module calls: ``loss(query, document, info=None) -> LossOutput``.

    :meth:`forward` validates the inputs, turns autocast off and casts the embeddings to the compute
    dtype, then calls :meth:`compute`, which subclasses implement. Most losses derive from
    :class:`SimilarityLoss`; wrappers such as :class:`losses.Matryoshka` derive from this class.
    """

    def forward(self, query: torch.Tensor, document: torch.Tensor, info: BatchInfo | None = None) -> LossOutput:
        validate_inputs(query, document, info)
        info = info if info is not None else BatchInfo()
        dtype = compute_dtype(query)
        with torch.autocast(query.device.type, enabled=False):
            return self.compute_loss(query.to(dtype), document.to(dtype), info)

    def compute_loss(self, query: torch.Tensor, document: torch.Tensor, info: BatchInfo) -> LossOutput:
        """The loss of validated float32 (or float64) embeddings, autocast off."""
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
        """Raise a ``ValueError`` when a :class:`BatchInfo` field this loss needs is missing."""

    def extra_positives(self, structure: Structure) -> torch.Tensor | None:
        """(N, N) query×document extra positives of the batch, or ``None`` when the loss uses none."""
        return None

    def compute(self, direction: Direction) -> torch.Tensor:
        """Per-anchor losses (A,) of one direction (subclasses implement it)."""
        raise NotImplementedError

    def compute_loss(self, query: torch.Tensor, document: torch.Tensor, info: BatchInfo) -> LossOutput:
        present = info.present()
        self.check_structure(present)
        for masker in self.maskers:
            masker.check_structure(present)
        dtype = query.dtype
        encoded = Structure.encode(query.shape[0], query.device, info, document.shape[0])
        batch = gather_batch(query, document, encoded, self.gather)
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
        # Anchors = all pairs: one matrix serves both directions (d2q reads the pairs' columns). The
        # extra documents are columns of q2d only: d2q's candidates are the queries.
        pairs = batch.structure.size
        full = rows.stop - rows.start == pairs
        shared = batch.queries @ batch.documents.T if full else None
        for name in names:
            if full:
                scores = shared if name == "q2d" else shared[:, :pairs].T
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
