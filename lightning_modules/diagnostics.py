"""Geometry of a joint audio-text embedding space: how far apart the two modalities sit, how well
paired items align, and how evenly each modality spreads over the space.

These numbers explain retrieval scores rather than replace them: a large modality gap or MMD with
good recall means the model ranks well despite keeping the modalities in separate regions; a
uniformity near 0 signals collapse.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def embedding_diagnostics(
    audio_emb: Tensor,
    audio_ids: Tensor,
    text_emb: Tensor,
    text_ids: Tensor,
    max_samples: int = 2048,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Modality gap, MMD, alignment and uniformity of audio and caption embeddings.

    All arithmetic is in float64; the embeddings are used as given (normalise them first for the
    hypersphere quantities of Wang & Isola to mean what the paper means).

    - ``diag/modality_gap``: ``||mean(audio) - mean(text)||_2`` over all rows, the distance between
      the two modality centroids (Liang et al. 2022, "Mind the Gap: Understanding the Modality Gap in
      Multi-modal Contrastive Representation Learning").
    - ``diag/mmd``: unbiased estimate of the squared maximum mean discrepancy between the audio and
      text distributions (Gretton et al. 2012, "A Kernel Two-Sample Test"), with the Gaussian kernel
      ``k(x, y) = exp(-||x - y||^2 / (2 sigma^2))``. ``sigma`` follows the median heuristic: the
      median distance over all pairs of distinct rows of the pooled (audio + text) sample. If over
      half of those pairs coincide that median is 0 and ``sigma`` falls back to the mean distance;
      if every row coincides MMD^2 is 0 for any ``sigma``, so 1 is used. The unbiased estimate can be
      slightly negative when the distributions match.
    - ``diag/alignment``: mean over (audio, caption of the same clip) pairs of ``||a - t||^2``, the
      alignment loss with alpha = 2 (Wang & Isola 2020, "Understanding Contrastive Representation
      Learning through Alignment and Uniformity on the Hypersphere"); lower is better aligned.
    - ``diag/uniformity_audio``, ``diag/uniformity_text``: ``log mean_{i<j} exp(-2 ||x_i - x_j||^2)``
      within each modality, the uniformity loss with t = 2 of the same paper; lower (more negative)
      is more uniform, 0 is total collapse.

    MMD and uniformity cost quadratic time and memory, so when a modality has more than
    ``max_samples`` rows they use a random subset of that many, drawn with a ``torch.Generator``
    seeded with ``seed`` (audio first, then text), which makes the numbers reproducible. The gap and
    alignment are linear and use every row.

    Args:
        audio_emb: ``(Na, D)`` audio embeddings.
        audio_ids: ``(Na,)`` unique integer clip ids.
        text_emb: ``(Nt, D)`` caption embeddings.
        text_ids: ``(Nt,)`` clip id of each caption; each must match an audio.
        max_samples: subset size per modality for MMD and uniformity (>= 2).
        seed: seed of the subset draw.

    Returns:
        The five values above as 0-d float32 tensors.

    Raises:
        ValueError: on bad shapes, non-finite values, fewer than 2 rows in a modality, duplicate audio
            ids, or a caption whose clip has no audio.
    """
    if max_samples < 2:
        raise ValueError(f"max_samples must be >= 2, got {max_samples}")
    for what, emb, ids in (("audio", audio_emb, audio_ids), ("caption", text_emb, text_ids)):
        if emb.ndim != 2 or ids.shape != (emb.shape[0],):
            raise ValueError(
                f"{what}: expected (N, D) embeddings and (N,) ids, got {tuple(emb.shape)} and {tuple(ids.shape)}"
            )
        if emb.shape[0] < 2:
            raise ValueError(f"diagnostics need at least 2 {what} embeddings, got {emb.shape[0]}")
        if ids.is_floating_point():
            raise ValueError(f"{what} ids must be an integer tensor")
        if not torch.isfinite(emb).all():
            raise ValueError(f"{what} embeddings contain NaN or inf")
    if audio_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embeddings must share D, got {tuple(audio_emb.shape)} and {tuple(text_emb.shape)}")
    audio_ids, text_ids = audio_ids.long(), text_ids.long()
    sorted_ids, order = audio_ids.sort()
    if sorted_ids.unique_consecutive().numel() != sorted_ids.numel():
        raise ValueError("audio_ids must be unique")
    slot = torch.searchsorted(sorted_ids, text_ids).clamp(max=sorted_ids.numel() - 1)
    missing = text_ids[sorted_ids[slot] != text_ids]
    if missing.numel():
        raise ValueError(f"captions refer to audio ids without an audio: {missing.unique()[:10].tolist()}")

    audio, text = audio_emb.double(), text_emb.double()
    out = {"diag/modality_gap": (audio.mean(0) - text.mean(0)).norm()}
    generator = torch.Generator().manual_seed(seed)
    audio_sample = _subset(audio, max_samples, generator)
    text_sample = _subset(text, max_samples, generator)
    out["diag/mmd"] = _mmd(audio_sample, text_sample)
    out["diag/alignment"] = (audio[order[slot]] - text).pow(2).sum(1).mean()
    out["diag/uniformity_audio"] = _uniformity(audio_sample)
    out["diag/uniformity_text"] = _uniformity(text_sample)
    return {name: value.float() for name, value in out.items()}


def _subset(rows: Tensor, max_samples: int, generator: torch.Generator) -> Tensor:
    if rows.shape[0] <= max_samples:
        return rows
    return rows[torch.randperm(rows.shape[0], generator=generator)[:max_samples].to(rows.device)]


def _squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """``||x_i - y_j||^2`` via the Gram matrix; in float64 the cancellation error stays ~1e-15."""
    return (x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2 * x @ y.T).clamp_min(0)


def _upper_triangle(square: Tensor) -> Tensor:
    """Entries ``i < j`` of a square matrix, i.e. each pair of distinct rows once."""
    return square[torch.ones_like(square, dtype=torch.bool).triu(1)]


def _mmd(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 with a Gaussian kernel whose width is set by the median heuristic."""
    pooled = torch.cat([x, y])
    squared = _squared_distances(pooled, pooled)
    distances = _upper_triangle(squared).sqrt()
    ascending = distances.sort().values
    sigma = (ascending[(ascending.numel() - 1) // 2] + ascending[ascending.numel() // 2]) / 2
    if sigma == 0:
        sigma = distances.mean()
    if sigma == 0:
        sigma = torch.ones_like(sigma)
    kernel = torch.exp(-squared / (2 * sigma**2))
    m, n = x.shape[0], y.shape[0]
    # The unbiased estimator leaves out the i == j terms of the within-sample sums.
    within_x = (kernel[:m, :m].sum() - kernel[:m, :m].diagonal().sum()) / (m * (m - 1))
    within_y = (kernel[m:, m:].sum() - kernel[m:, m:].diagonal().sum()) / (n * (n - 1))
    across = kernel[:m, m:].mean()
    return within_x + within_y - 2 * across


def _uniformity(x: Tensor) -> Tensor:
    """``log mean_{i<j} exp(-2 ||x_i - x_j||^2)``; logsumexp keeps it finite for spread-out points."""
    exponents = -2 * _upper_triangle(_squared_distances(x, x))
    return torch.logsumexp(exponents, 0) - math.log(exponents.numel())
