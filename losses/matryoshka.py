"""Matryoshka wrapper: one loss applied at several truncated embedding sizes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.base import ContrastiveLoss, LossOutput
from losses.structure import BatchInfo


class Matryoshka(ContrastiveLoss):
    """Train embeddings whose prefixes are embeddings too.

    The wrapped loss is applied to the first ``d`` dimensions of the query and document embeddings,
    re-normalised to unit length, for every ``d`` in ``dims``; the result is ``Σ_k w_k · L(d_k)``.
    At inference the embedding can then be cut to any of these sizes.

    The wrapped loss keeps its own temperature (shared by all sizes), maskers and gathering. Logs
    ``loss_dim{d}`` for every size plus the wrapped loss's logs at the largest size.

    Args:
        loss: the loss applied at every size.
        dims: embedding sizes (each at most the embedding dimension).
        weights: weight of each size; equal weights of 1 when omitted.

    References:
        Kusupati et al., "Matryoshka Representation Learning", 2022.

    Example:
        >>> import torch
        >>> from losses import InfoNCE
        >>> loss = Matryoshka(InfoNCE(), dims=[8, 4, 2])
        >>> q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
        >>> sorted(k for k in loss(q, q).logs if k.startswith("loss_dim"))
        ['loss_dim2', 'loss_dim4', 'loss_dim8']
    """

    def __init__(self, loss: ContrastiveLoss, dims: list[int], weights: list[float] | None = None):
        super().__init__()
        if not dims or any(not isinstance(d, int) or d <= 0 for d in dims) or len(set(dims)) != len(dims):
            raise ValueError(f"dims must be distinct positive ints, got {dims}")
        if weights is not None and len(weights) != len(dims):
            raise ValueError(f"weights needs one entry per dim ({len(dims)}), got {len(weights)}")
        self.loss = loss
        self.dims = list(dims)
        self.weights = [1.0] * len(dims) if weights is None else list(weights)

    def compute_loss(self, query: torch.Tensor, document: torch.Tensor, info: BatchInfo) -> LossOutput:
        if max(self.dims) > query.shape[1]:
            raise ValueError(f"dims {self.dims} exceed the embedding dimension {query.shape[1]}")
        # Re-normalised in the loss's compute precision (the base class cast), not in bf16/fp16.
        total, logs = 0.0, {}
        for dim, weight in sorted(zip(self.dims, self.weights), reverse=True):
            out = self.loss(F.normalize(query[:, :dim], dim=-1), F.normalize(document[:, :dim], dim=-1), info)
            total = total + weight * out.loss
            if not logs:
                logs.update(out.logs)
            logs[f"loss_dim{dim}"] = out.loss.detach()
        return LossOutput(total, logs)
