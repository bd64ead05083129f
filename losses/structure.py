"""Batch structure as tensors, and the per-direction view of the similarity matrix.

The optional batch information a loss receives (:class:`BatchInfo`: clip indices, document texts, tag
clusters, caption kinds, an explicit positive mask, guide-model scores) is encoded once into tensors on the embeddings' device.
Strings and sets become 64-bit keys so that they can be compared as a B×B matrix and gathered across
processes with a fixed-size collective; two different strings or sets share a key with probability
about 2⁻⁶⁴ per pair, which we accept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, Literal

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


def _check_list(name: str, value: Any, batch: int, item_ok, item_doc: str) -> None:
    if not isinstance(value, (list, tuple)) or len(value) != batch:
        length = len(value) if hasattr(value, "__len__") else "?"
        raise ValueError(f"{name} must be a list of {batch} {item_doc}, got {type(value).__name__} of length {length}")
    for i, item in enumerate(value):
        if not item_ok(item):
            raise TypeError(f"{name}[{i}] must be {item_doc}, got {item!r}")


def _check_matrix(name: str, value: Any, batch: int, documents: int, ok, kind: str) -> None:
    """A (batch, batch) matrix, or (batch, documents) when the batch has extra documents."""
    shapes = {(batch, batch), (batch, documents)}
    if not isinstance(value, torch.Tensor) or not ok(value) or tuple(value.shape) not in shapes:
        expected = " or ".join(str(shape) for shape in sorted(shapes))
        raise ValueError(
            f"{name} must be a {kind} tensor of shape {expected}, got "
            f"{getattr(value, 'dtype', type(value))} {tuple(getattr(value, 'shape', ()))}"
        )


def _is_cluster_set(item: Any) -> bool:
    return isinstance(item, (set, frozenset)) and all(isinstance(c, int) and not isinstance(c, bool) for c in item)


@dataclass
class BatchInfo:
    """What a loss may know about a training batch besides the embeddings; every field is optional.

    Built by the pair collator (``datamodules.collate.PairCollator``) and passed as
    ``loss(query, document, info)``; row ``i`` describes pair ``i``. A new field is one attribute
    here, its check in :meth:`validate` and its encoding in :meth:`Structure.encode`.

    A batch may hold more documents than queries: documents ``B ..`` are extra negatives (e.g. the
    hard negatives of text pairs), candidates of every query but no one's target and never anchors.
    They belong to no clip and carry no tags; their texts may be given as ``extra_texts``.
    ``positive_mask`` and ``guide_scores`` may then be (B, B) (the extra columns are "not a
    positive" and "never dropped by the guide") or cover every document, (B, B + M).

    Attributes:
        clip_index: LongTensor (B,), the integer index of each pair's clip (several captions of one
            clip share it). (The batch's ``clip_ids`` are the clips' string ids, for messages.)
        texts: B document texts (identical texts are the same item).
        positive_mask: BoolTensor (B, B), extra (query, document) positives.
        tag_clusters: B sets of tag-cluster ids (see :class:`losses.TagClusterMap`).
        caption_kinds: B strings, which caption was sampled ("long", "short", "tags", ...).
        guide_scores: Tensor (B, B), a frozen guide model's query×document similarities.
        extra_texts: M texts of the extra documents (rows ``B ..`` of the document embeddings).
    """

    clip_index: torch.Tensor | None = None
    texts: list[str] | None = None
    positive_mask: torch.Tensor | None = None
    tag_clusters: list[frozenset[int]] | None = None
    caption_kinds: list[str] | None = None
    guide_scores: torch.Tensor | None = None
    extra_texts: list[str] | None = None

    def present(self) -> set[str]:
        """Names of the fields that are set."""
        return {f.name for f in fields(self) if getattr(self, f.name) is not None}

    def validate(self, batch: int, documents: int | None = None) -> None:
        """Raise a ``ValueError``/``TypeError`` naming the offending field if anything is malformed.

        ``batch`` is the number of pairs (queries), ``documents`` the number of documents (``batch``
        when omitted; more when the batch has extra negatives).
        """
        documents = batch if documents is None else documents
        index = self.clip_index
        if index is not None and (
            not isinstance(index, torch.Tensor)
            or index.is_floating_point()
            or index.is_complex()
            or index.dtype == torch.bool
            or tuple(index.shape) != (batch,)
        ):
            raise ValueError(
                f"clip_index must be an integer tensor of shape ({batch},), got "
                f"{getattr(index, 'dtype', type(index))} {tuple(getattr(index, 'shape', ()))}"
            )
        if self.texts is not None:
            _check_list("texts", self.texts, batch, lambda t: isinstance(t, str), "strings")
        if self.caption_kinds is not None:
            _check_list("caption_kinds", self.caption_kinds, batch, lambda t: isinstance(t, str), "strings")
        if self.tag_clusters is not None:
            _check_list("tag_clusters", self.tag_clusters, batch, _is_cluster_set, "sets of int cluster ids")
        if self.extra_texts is not None:
            _check_list("extra_texts", self.extra_texts, documents - batch, lambda t: isinstance(t, str), "strings")
        if self.positive_mask is not None:
            _check_matrix(
                "positive_mask", self.positive_mask, batch, documents, lambda m: m.dtype == torch.bool, "boolean"
            )
        if self.guide_scores is not None:
            _check_matrix(
                "guide_scores", self.guide_scores, batch, documents, torch.Tensor.is_floating_point, "floating-point"
            )
            if torch.isnan(self.guide_scores).any():
                raise ValueError("guide_scores contain NaN")


#: clip id of the extra documents: they belong to no clip (clip indices are >= 0).
NO_CLIP = -1


@dataclass
class Structure:
    """Optional batch structure over ``size`` pairs and ``documents`` documents, encoded as tensors.

    Row ``i`` describes pair ``i`` (query ``i`` with document ``i``); documents ``size ..`` are the
    extra negatives (:class:`BatchInfo`). Per-document keys have one entry per document, the pairs'
    first; matrices are indexed (query, document). After gathering across processes, ``size`` is the
    global number of pairs and ``documents`` the global number of documents, pairs first, each part
    in rank order.

    Attributes:
        size: number of pairs.
        documents: number of documents (``size`` plus the extra negatives).
        clip_ids: (documents,) clip id of each document (:data:`NO_CLIP` for the extras).
        text_keys: (documents,) key of each document text (identical texts share a key).
        tag_keys: (documents,) key of each document's set of tag clusters, 0 when the set is empty.
        kind_keys: (documents,) key of each document's caption kind (``string_key("tags")`` etc.).
        positive_mask: (size, documents) explicit extra positives.
        guide_scores: (size, documents) similarities from a frozen guide model.
    """

    size: int
    documents: int = -1
    clip_ids: torch.Tensor | None = None
    text_keys: torch.Tensor | None = None
    tag_keys: torch.Tensor | None = None
    kind_keys: torch.Tensor | None = None
    positive_mask: torch.Tensor | None = None
    guide_scores: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.documents < 0:
            self.documents = self.size

    @classmethod
    def encode(cls, size: int, device: torch.device, info: BatchInfo, documents: int | None = None) -> Structure:
        """Encode a validated :class:`BatchInfo` of ``size`` pairs and ``documents`` documents."""
        documents = size if documents is None else documents
        extra = documents - size

        def keys(values: list[int] | None, pad: int) -> torch.Tensor | None:
            return None if values is None else torch.tensor(values + [pad] * extra, dtype=torch.long, device=device)

        def widened(matrix: torch.Tensor | None, fill: float | bool) -> torch.Tensor | None:
            if matrix is None:
                return None
            matrix = matrix.to(device)
            if matrix.shape[1] == documents:
                return matrix
            out = torch.full((size, documents), fill, dtype=matrix.dtype, device=device)
            out[:, :size] = matrix
            return out

        text_keys = None
        if info.texts is not None:
            # Extra documents without texts get the key of "", which no (non-empty) text has.
            extra_texts = info.extra_texts if info.extra_texts is not None else [""] * extra
            text_keys = torch.tensor(
                [string_key(t) for t in list(info.texts) + list(extra_texts)], dtype=torch.long, device=device
            )
        clip_ids = None
        if info.clip_index is not None:
            clip_ids = info.clip_index.to(device=device, dtype=torch.long)
            clip_ids = torch.cat([clip_ids, clip_ids.new_full((extra,), NO_CLIP)])
        return cls(
            size=size,
            documents=documents,
            clip_ids=clip_ids,
            text_keys=text_keys,
            tag_keys=keys(None if info.tag_clusters is None else [cluster_set_key(c) for c in info.tag_clusters], 0),
            kind_keys=keys(
                None if info.caption_kinds is None else [string_key(k) for k in info.caption_kinds],
                string_key("extra"),
            ),
            positive_mask=widened(info.positive_mask, False),
            guide_scores=widened(info.guide_scores, float("-inf")),
        )

    def duplicates(self) -> torch.Tensor | None:
        """(size, documents) query×document pairs that are the same item: same clip id or identical
        document text."""
        same = None
        for key in (self.clip_ids, self.text_keys):
            if key is not None:
                match = key[: self.size, None] == key[None, :]
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
        """The anchors' rows of an (N, N + M) query×document ``matrix`` in this direction (the
        document→query direction has the N pairs' documents as anchors and the N queries as
        candidates)."""
        pairs = matrix.shape[0]
        return (matrix if self.name == "q2d" else matrix[:, :pairs].T)[self.targets]

    def same(self, keys: torch.Tensor) -> torch.Tensor:
        """(A, C) where the anchor's key equals the candidate's key (``keys`` is per document, pairs
        first; the candidates are the first C of them)."""
        return keys[self.targets][:, None] == keys[None, : self.scores.shape[1]]

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
