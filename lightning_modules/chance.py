"""Chance levels: the expected value of each reported metric when the model ranks at random.

An R@1 of 12 means little without the set's size: with 100 clips chance is 1, with 8 it is 12.5.
The evaluation reports these next to the metrics (``chance/t2a/R@1``, ...). Each function gives the
exact expectation over a uniformly random order of the candidates (every order equally likely, no
ties), per query, for a query with ``n`` candidates of which ``m`` are relevant; the reported chance
level is the mean over the set's queries, in percent like the metric itself (ranks excepted).

Derivations, with rel_r = 1 when the candidate at rank r is relevant (P(rel_r) = m / n and
P(rel_r and rel_s) = m (m - 1) / (n (n - 1)) for r != s):

- R@k (a relevant item within the top k): 1 - C(n - m, k) / C(n, k).
- AP@K as reported (the sum over relevant ranks r <= K of hits(r) / r, divided by m):
  E = (1 / m) sum_{r <= K} E[rel_r hits(r)] / r, with E[rel_r hits(r)] = m / n + (r - 1) m (m - 1) /
  (n (n - 1)), which gives (H_K + (K - H_K) (m - 1) / (n - 1)) / n for K <= n (H_K the K-th
  harmonic number). With K = n this is the expected full average precision.
- mean rank of the best relevant item: (n + 1) / (m + 1).
- HNSR@k (target within the top k, hard negative not), one target and one negative among n:
  k (n - k) / (n (n - 1)).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["average_precision", "hard_negative_success", "mean_best_rank", "recall_at_k"]


def _as_float64(n: Tensor | int, m: Tensor | int) -> tuple[Tensor, Tensor]:
    m = torch.as_tensor(m, dtype=torch.float64)
    n, m = torch.broadcast_tensors(torch.as_tensor(n, dtype=torch.float64, device=m.device), m)
    if bool((m < 1).any()) or bool((m > n).any()):
        raise ValueError("every query needs 1 <= relevant items <= candidates")
    return n, m


def recall_at_k(n: Tensor | int, m: Tensor | int, k: int) -> Tensor:
    """P(at least one of ``m`` relevant among ``n`` candidates ranks within ``k``), per query."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n, m = _as_float64(n, m)
    miss = torch.ones_like(n)
    for i in range(k):
        # Drawing the top k one by one without replacement, all irrelevant. Once n - m - i reaches 0
        # every later factor is 0 anyway, so a zero denominator (k > n) is never used.
        factor = torch.where(n - i > 0, (n - m - i).clamp(min=0) / (n - i).clamp(min=1), 0.0)
        miss = miss * factor
    return 1 - miss


def _harmonic(k: Tensor) -> Tensor:
    """H_k = 1 + 1/2 + ... + 1/k for non-negative integer-valued float64 ``k``."""
    return torch.special.digamma(k + 1) + 0.57721566490153286061


def average_precision(n: Tensor | int, m: Tensor | int, cutoff: int | None = None) -> Tensor:
    """Expected AP@``cutoff`` (``None``: full AP) as reported, divided by all ``m`` relevant items."""
    n, m = _as_float64(n, m)
    k = n if cutoff is None else n.clamp(max=cutoff)
    harmonic = _harmonic(k)
    pairs = torch.where(n > 1, (k - harmonic) * (m - 1) / (n - 1).clamp(min=1), 0.0)
    return (harmonic + pairs) / n


def mean_best_rank(n: Tensor | int, m: Tensor | int) -> Tensor:
    """Expected rank (1-based) of the best of ``m`` relevant among ``n`` candidates."""
    n, m = _as_float64(n, m)
    return (n + 1) / (m + 1)


def hard_negative_success(n: Tensor | int, k: int) -> Tensor:
    """P(target within the top ``k`` and hard negative not) among ``n >= 2`` candidates."""
    n = torch.as_tensor(n, dtype=torch.float64)
    if bool((n < 2).any()):
        raise ValueError("a hard-negative query needs at least 2 candidates")
    return torch.where(n > k, k * (n - k) / (n * (n - 1)), 0.0)
