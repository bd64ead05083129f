"""Batch structure as tensors, and the per-direction view of the similarity matrix.

The optional structure a loss receives (clip ids, document texts, tag clusters, caption kinds, an
explicit positive mask, guide-model scores) is encoded once into tensors on the embeddings' device.
Strings and sets become 64-bit keys so that they can be compared as a B×B matrix and gathered across
processes with a fixed-size collective; two different strings or sets share a key with probability
about 2⁻⁶⁴ per pair, which we accept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

DirectionName = Literal["q2d", "d2q"]


def string_key(text: str) -> int:
    """A signed 64-bit key of ``text`` that is the same in every process.

    Python's ``hash`` is salted per process, which would break comparisons after gathering.
    """
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def cluster_set_key(clusters: Iterable[int]) -> int:
    """Key of a set of cluster ids; 0 stands for the empty set (a row without tag positives)."""
    ids = sorted(set(clusters))
    if not ids:
        return 0
    # 0 is reserved for "no tags"; a non-empty set hashing to 0 is moved off it.
    return string_key(",".join(map(str, ids))) or 1


@dataclass
class Structure:
    """Optional batch structure over ``size`` pairs, encoded as tensors.

    Row ``i`` describes pair ``i`` (query ``i`` with document ``i``). Matrices are indexed
    (query, document). After gathering across processes, ``size`` is the global batch and the rows
    are in rank order.

    Attributes:
        size: number of pairs.
        clip_ids: (N,) clip id of each pair.
        text_keys: (N,) key of each document text (identical texts share a key).
        tag_keys: (N,) key of each row's set of tag clusters, 0 when the set is empty.
        kind_keys: (N,) key of each row's caption kind (``string_key("tags")`` etc.).
        positive_mask: (N, N) explicit extra positives.
        guide_scores: (N, N) similarities from a frozen guide model.
    """

    size: int
    clip_ids: torch.Tensor | None = None
    text_keys: torch.Tensor | None = None
    tag_keys: torch.Tensor | None = None
    kind_keys: torch.Tensor | None = None
    positive_mask: torch.Tensor | None = None
    guide_scores: torch.Tensor | None = None

    @classmethod
    def encode(
        cls,
        size: int,
        device: torch.device,
        clip_ids: torch.Tensor | None = None,
        texts: list[str] | None = None,
        positive_mask: torch.Tensor | None = None,
        tag_clusters: list[frozenset[int]] | None = None,
        caption_kinds: list[str] | None = None,
        guide_scores: torch.Tensor | None = None,
    ) -> Structure:
        """Encode validated structure keyword arguments (see :func:`losses.base.validate_inputs`)."""

        def keys(values: list[int] | None) -> torch.Tensor | None:
            return None if values is None else torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            size=size,
            clip_ids=None if clip_ids is None else clip_ids.to(device=device, dtype=torch.long),
            text_keys=keys(None if texts is None else [string_key(t) for t in texts]),
            tag_keys=keys(None if tag_clusters is None else [cluster_set_key(c) for c in tag_clusters]),
            kind_keys=keys(None if caption_kinds is None else [string_key(k) for k in caption_kinds]),
            positive_mask=None if positive_mask is None else positive_mask.to(device),
            guide_scores=None if guide_scores is None else guide_scores.to(device),
        )

    def duplicates(self) -> torch.Tensor | None:
        """(N, N) pairs that are the same item: same clip id or identical document text."""
        same = None
        for key in (self.clip_ids, self.text_keys):
            if key is not None:
                match = key[:, None] == key[None, :]
                same = match if same is None else same | match
        return same


@dataclass
class Direction:
    """One retrieval direction: anchors (rows) against candidates (columns).

    For ``"q2d"`` the anchors are queries and the candidates documents; for ``"d2q"`` the reverse,
    so its rows are columns of the query×document matrix. Anchor ``a`` is pair ``targets[a]`` of
    the (possibly gathered) batch, and its true candidate is column ``targets[a]``.

    Attributes:
        name: ``"q2d"`` or ``"d2q"``.
        scores: (A, C) similarities.
        logits: (A, C) similarities divided by τ.
        targets: (A,) column of each anchor's true pair.
        positives: (A, C) extra positives besides the target, or ``None``.
        drop: (A, C) negatives removed from the denominators by the maskers, or ``None``. Never
            contains a target or an extra positive.
    """

    name: DirectionName
    scores: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    positives: torch.Tensor | None = None
    drop: torch.Tensor | None = None

    def view(self, matrix: torch.Tensor) -> torch.Tensor:
        """The anchors' rows of an (N, N) query×document ``matrix`` in this direction."""
        return (matrix if self.name == "q2d" else matrix.T)[self.targets]

    def same(self, keys: torch.Tensor) -> torch.Tensor:
        """(A, C) where the anchor's key equals the candidate's key (``keys`` is per pair, (N,))."""
        return keys[self.targets][:, None] == keys[None, :]

    def target_mask(self) -> torch.Tensor:
        mask = torch.zeros_like(self.scores, dtype=torch.bool)
        mask[torch.arange(len(self.targets), device=mask.device), self.targets] = True
        return mask

    def negatives(self) -> torch.Tensor:
        """(A, C) candidates that count as negatives: not the target, not a positive, not dropped."""
        negatives = ~self.target_mask()
        for excluded in (self.positives, self.drop):
            if excluded is not None:
                negatives &= ~excluded
        return negatives

    def masked_logits(self) -> torch.Tensor:
        """Logits with dropped negatives at -inf, so they vanish from every softmax."""
        return self.logits if self.drop is None else self.logits.masked_fill(self.drop, float("-inf"))
