"""Cross-process negatives: the one place where embeddings and batch structure are gathered.

Modes (the ``gather`` argument of :class:`~losses.base.SimilarityLoss`):

- ``"none"``: in-batch negatives of this process only.
- ``"local"``: this process's anchors against the candidates of all processes (open_clip's
  ``local_loss``): two (B × N) similarity strips per step instead of one (N × N) matrix.
- ``"global"``: every process computes the full (N × N) loss of the global batch.

Both gathering modes reproduce the single-process loss and gradient of the concatenated batch
under DDP (or FSDP) gradient averaging, without any extra scaling:

- Embeddings are gathered with ``torch.distributed.nn.functional.all_gather``, whose backward
  *sums* the gradients every process computed for a block into the process that owns it. So the
  gradient that reaches process r's embeddings is ∂(Σ_p L_p)/∂x_r, where L_p is the loss
  process p computed.
- DDP then *averages* parameter gradients over the W processes. The final gradient equals that of
  the single-process loss L exactly when Σ_p L_p = W · L.
- ``"global"``: every L_p = L, so Σ_p L_p = W · L as it stands. (Dividing by W here is the
  bug to avoid: the step would be W times too small. Gathering without gradient and putting the
  local tensor back in, as some repositories do, has the same effect.)
- ``"local"``: L_p sums the per-anchor losses of p's anchors and divides by N / W (not by
  p's own batch size), so Σ_p L_p = W · L even when batch sizes differ between processes.

Each process logs its own L_p; their mean over processes is the loss of the global batch. A
learnable temperature is a replicated parameter and gets the same treatment (its averaged gradient
is ∂L/∂τ in both modes).

Structure is gathered for the masks that need it: clip ids, document texts, tag clusters and
caption kinds are per document, so they are exact after gathering. Extra documents (negatives
beyond the pairs) are gathered as a second part after every process's pair documents, so the
pairs keep their diagonal. ``positive_mask`` and
``guide_scores`` are (B, B) within one process: they become block-diagonal, cross-process entries
being "not a positive" and "never dropped by the guide". Every process must pass the same
structure keys (the collectives must match). Processes may hold different batch sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F

from losses.structure import Structure

GatherMode = Literal["none", "local", "global"]


@dataclass
class GatheredBatch:
    """Embeddings and structure a loss works on, after any gathering.

    Attributes:
        queries: (N, D) queries of all candidates (the global batch when gathering).
        documents: (N, D) documents of all candidates.
        anchors: the rows of this process's anchors in the candidate order.
        structure: the structure of the N pairs.
        norm: factor applied to the sum of the per-anchor losses of one direction.
    """

    queries: torch.Tensor
    documents: torch.Tensor
    anchors: slice
    structure: Structure
    norm: float


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) outside distributed runs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_batch(
    query: torch.Tensor, document: torch.Tensor, structure: Structure, mode: GatherMode
) -> GatheredBatch:
    """Gather per ``mode``; a no-op for ``"none"`` and outside distributed runs.

    ``document`` holds the B pair documents and then any extra negatives; after gathering, the
    documents are every process's pair documents (rank order), then every process's extras.
    """
    rank, world_size = world()
    n = query.shape[0]
    if mode == "none" or world_size == 1:
        return GatheredBatch(query, document, slice(0, n), structure, 1.0 / n)
    counts = torch.tensor([n, document.shape[0] - n], device=query.device)
    sizes, extra_sizes = _all_gather(counts[None], [1] * world_size).T.tolist()
    total, offset = sum(sizes), sum(sizes[:rank])
    queries = _all_gather(query, sizes, with_grad=True)
    documents = _all_gather(document[:n], sizes, with_grad=True)
    if any(extra_sizes):
        documents = torch.cat([documents, _all_gather(document[n:], extra_sizes, with_grad=True)])
    gathered = _gather_structure(structure, sizes, extra_sizes)
    if mode == "local":
        return GatheredBatch(queries, documents, slice(offset, offset + n), gathered, world_size / total)
    return GatheredBatch(queries, documents, slice(0, total), gathered, 1.0 / total)


def _all_gather(x: torch.Tensor, sizes: list[int], with_grad: bool = False) -> torch.Tensor:
    """Concatenate every process's ``x`` along dim 0; ``sizes`` are the per-process lengths."""
    # Some backends (gloo) reject bool tensors in collectives.
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x
    # Collectives need equal shapes: pad to the longest batch and cut the padding off again.
    padded = F.pad(wire, (0, 0) * (x.ndim - 1) + (0, max(sizes) - x.shape[0])).contiguous()
    if with_grad:
        parts = dist_fn.all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(x.dtype)


def _block_diagonal(x: torch.Tensor, sizes: list[int], columns: list[int], fill: float | bool) -> torch.Tensor:
    """Gather per-process (B_r, C_r) matrices into a (ΣB, ΣC) block-diagonal one filled with ``fill``."""
    padded = torch.full((x.shape[0], max(columns)), fill, dtype=x.dtype, device=x.device)
    padded[:, : x.shape[1]] = x
    rows = _all_gather(padded, sizes)
    out = torch.full((sum(sizes), sum(columns)), fill, dtype=x.dtype, device=x.device)
    row = column = 0
    for size, width in zip(sizes, columns):
        out[row : row + size, column : column + width] = rows[row : row + size, :width]
        row, column = row + size, column + width
    return out


def _gather_structure(structure: Structure, sizes: list[int], extra_sizes: list[int]) -> Structure:
    """Per-document keys and (pairs × documents) matrices of every process, pairs first, then extras."""
    n = structure.size
    out = Structure(size=sum(sizes), documents=sum(sizes) + sum(extra_sizes))
    for f in fields(Structure):
        value = getattr(structure, f.name)
        if f.name in ("size", "documents") or value is None:
            continue
        if f.name in ("positive_mask", "guide_scores"):
            fill = False if f.name == "positive_mask" else float("-inf")
            parts = [_block_diagonal(value[:, :n], sizes, sizes, fill)]
            if any(extra_sizes):
                parts.append(_block_diagonal(value[:, n:], sizes, extra_sizes, fill))
            value = torch.cat(parts, 1)
        else:
            parts = [_all_gather(value[:n], sizes)]
            if any(extra_sizes):
                parts.append(_all_gather(value[n:], extra_sizes))
            value = torch.cat(parts)
        setattr(out, f.name, value)
    return out
