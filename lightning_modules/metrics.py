"""Audio-text retrieval metrics under the AudioCaps / Clotho protocol (DESIGN.md section 5)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

RECALL_AT: tuple[int, ...] = (1, 5, 10)
"""Cut-offs reported as ``R@k``."""

MAP_CUTOFF: int = 10
"""Cut-off of the reported ``mAP@10``."""

COMPARE_MAX_SLOTS: int = 8
"""Up to this many relevant items per query, ranks come from direct comparisons; beyond, from
sorting each score row (cost independent of the number of relevant items)."""


def retrieval_metrics(
    audio_emb: Tensor,
    audio_ids: Tensor,
    text_emb: Tensor,
    text_ids: Tensor,
    text_keys: Tensor | None = None,
    chunk_size: int = 1024,
) -> dict[str, Tensor]:
    """Text-to-audio and audio-to-text retrieval metrics over a whole evaluation set.

    A caption is relevant to the audio with the same id. Every caption is a T2A query with exactly
    one relevant audio; every audio is an A2T query whose relevant captions are all captions sharing
    its id (usually 5, any number >= 1 works). Similarity is the float32 dot product, so the
    embeddings should already be L2-normalised for it to be the cosine.

    Ranks are 1-based, with ties resolved pessimistically: a relevant item's rank counts every
    irrelevant candidate that scores *greater than or equal to* it. Relevant items of the same query
    that tie with each other are ordered by caption key (or position when ``text_keys`` is ``None``),
    which keeps their ranks distinct; none of the reported numbers depends on that order because it
    only permutes which relevant caption gets which of the tied ranks. In full::

        rank(r) = 1 + #{irrelevant j: s_j >= s_r}
                    + #{relevant j != r: s_j > s_r or (s_j == s_r and j < r)}

    Reported values, all as 0-d float32 tensors under ``"t2a/<name>"`` and ``"a2t/<name>"``:

    - ``R@1``, ``R@5``, ``R@10``: percentage (0-100) of queries with a relevant item ranked <= k
      (for A2T: the best-ranked relevant caption).
    - ``mAP@10``: percentage (0-100). Per query, the relevant ranks r_1 < r_2 < ... are sorted
      ascending and AP@10 = sum over r_i <= 10 of (i / r_i), divided by the number of relevant items.
      For T2A this is the reciprocal rank truncated at 10. Sorting matters: LAION-CLAP pairs the
      i-th caption *in annotation order* with hit count i, which can even exceed 1.
    - ``medr``: median rank (of the best relevant item for A2T), floored when the count is even, the
      way CLAP-style evaluation code reports ``floor(median(0-based ranks)) + 1``.
    - ``meanr``: mean rank.

    Args:
        audio_emb: ``(Na, D)`` audio embeddings.
        audio_ids: ``(Na,)`` integer clip ids, unique.
        text_emb: ``(Nt, D)`` caption embeddings.
        text_ids: ``(Nt,)`` clip id of each caption; each must match an audio, and every audio needs
            at least one caption.
        text_keys: optional ``(Nt,)`` unique caption keys, used only to order tied relevant captions
            independently of the order the captions arrive in.
        chunk_size: queries scored at a time; peak memory is a few times ``chunk_size * N * 4``
            bytes for ``N`` candidates (about 100 MB per 1024 x 25,000 chunk).

    Returns:
        ``{"t2a/R@1", "t2a/R@5", "t2a/R@10", "t2a/mAP@10", "t2a/medr", "t2a/meanr"}`` and the same
        six under ``"a2t/"``.

    Raises:
        ValueError: on mismatched shapes, duplicate audio ids or caption keys, non-finite embeddings,
            a caption without its audio, or an audio without captions.
    """
    _check_inputs(audio_emb, audio_ids, text_emb, text_ids, text_keys)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    audio_ids, text_ids = audio_ids.long(), text_ids.long()
    if audio_ids.unique().numel() != audio_ids.numel():
        raise ValueError("audio_ids must be unique; deduplicate gathered audios first")

    # Sort captions by (clip id, key) so each audio's relevant captions form one contiguous block
    # already in tie-break order; the stable second sort keeps the key order within a clip.
    if text_keys is not None:
        if text_keys.unique().numel() != text_keys.numel():
            raise ValueError("text_keys must be unique; deduplicate gathered captions first")
        by_key = text_keys.argsort()
        text_emb, text_ids = text_emb[by_key], text_ids[by_key]
    by_id = torch.sort(text_ids, stable=True).indices
    text_emb, text_ids = text_emb[by_id], text_ids[by_id]

    audio_emb, text_emb = audio_emb.float(), text_emb.float()
    if not (torch.isfinite(audio_emb).all() and torch.isfinite(text_emb).all()):
        raise ValueError("embeddings contain NaN or inf, which would make every rank meaningless")
    num_audio = audio_ids.numel()

    # Text -> index of its audio.
    audio_sorted_ids, audio_order = audio_ids.sort()
    slot = torch.searchsorted(audio_sorted_ids, text_ids).clamp(max=num_audio - 1)
    if not torch.equal(audio_sorted_ids[slot], text_ids):
        missing = text_ids[audio_sorted_ids[slot] != text_ids].unique()
        raise ValueError(f"captions refer to audio ids without an audio: {missing[:10].tolist()}")
    text_target = audio_order[slot]

    # Audio -> its block of captions.
    clip_ids, counts = torch.unique_consecutive(text_ids, return_counts=True)
    starts = counts.cumsum(0) - counts
    block = torch.searchsorted(clip_ids, audio_ids).clamp(max=clip_ids.numel() - 1)
    if not torch.equal(clip_ids[block], audio_ids):
        missing = audio_ids[clip_ids[block] != audio_ids]
        raise ValueError(f"audio ids without any caption: {missing[:10].tolist()}")
    audio_start, audio_count = starts[block], counts[block]

    one = torch.ones_like(text_target)
    t2a_ranks = _chunked_ranks(
        text_emb, audio_emb, text_target.unsqueeze(1), one.bool().unsqueeze(1), chunk_size
    )
    # Pad every audio's caption block to the largest one; padding indices only need to be in range.
    slots = torch.arange(int(audio_count.max()), device=audio_count.device)
    block_index = (audio_start.unsqueeze(1) + slots).clamp(max=text_ids.numel() - 1)
    block_valid = slots < audio_count.unsqueeze(1)
    a2t_ranks = _chunked_ranks(audio_emb, text_emb, block_index, block_valid, chunk_size)

    t2a = _summarise(t2a_ranks, one)
    a2t = _summarise(a2t_ranks, audio_count)
    metrics = {}
    for direction, summary in (("t2a", t2a), ("a2t", a2t)):
        for name, value in summary.items():
            metrics[f"{direction}/{name}"] = value
    return metrics


def _check_inputs(
    audio_emb: Tensor, audio_ids: Tensor, text_emb: Tensor, text_ids: Tensor, text_keys: Tensor | None
) -> None:
    if audio_emb.ndim != 2 or text_emb.ndim != 2 or audio_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"embeddings must be (N, D) with the same D, got {tuple(audio_emb.shape)} and "
            f"{tuple(text_emb.shape)}"
        )
    if audio_ids.shape != (audio_emb.shape[0],) or text_ids.shape != (text_emb.shape[0],):
        raise ValueError(
            f"ids must be 1-D with one entry per embedding row, got audio_ids {tuple(audio_ids.shape)} "
            f"for {audio_emb.shape[0]} audios and text_ids {tuple(text_ids.shape)} for "
            f"{text_emb.shape[0]} captions"
        )
    if audio_emb.shape[0] == 0 or text_emb.shape[0] == 0:
        raise ValueError("retrieval needs at least one audio and one caption")
    if text_keys is not None and text_keys.shape != text_ids.shape:
        raise ValueError(
            f"text_keys shape {tuple(text_keys.shape)} != text_ids shape {tuple(text_ids.shape)}"
        )
    if audio_ids.is_floating_point() or text_ids.is_floating_point():
        raise ValueError("audio_ids and text_ids must be integer tensors")
    if text_keys is not None and text_keys.is_floating_point():
        raise ValueError("text_keys must be an integer tensor")


def _chunked_ranks(
    queries: Tensor, candidates: Tensor, rel_index: Tensor, rel_valid: Tensor, chunk_size: int
) -> Tensor:
    """Ranks ``(Q, K)`` of the candidates ``rel_index[q, rel_valid[q]]`` relevant to each query.

    Scoring ``chunk_size`` queries at a time bounds memory; invalid (padding) slots get rank
    ``N + 1`` so they sort after every real rank.
    """
    out = []
    for begin in range(0, queries.shape[0], chunk_size):
        end = begin + chunk_size
        scores = queries[begin:end] @ candidates.T
        out.append(_relevant_ranks(scores, rel_index[begin:end], rel_valid[begin:end]))
    return torch.cat(out)


def _relevant_ranks(scores: Tensor, rel_index: Tensor, rel_valid: Tensor) -> Tensor:
    """Apply the tie policy to one chunk: ``scores (Q, N)``, ``rel_index``/``rel_valid (Q, K)``."""
    num_candidates = scores.shape[1]
    # Gathering from the same score matrix keeps equal scores bit-identical, so the >= and ==
    # comparisons below see exactly the ties the ranking has.
    rel_scores = scores.gather(1, rel_index)
    at_least = _count_at_least(scores, rel_scores)

    this = rel_scores.unsqueeze(2)  # relevant item r, (Q, K, 1)
    other = rel_scores.unsqueeze(1)  # relevant item j, (Q, 1, K)
    other_valid = rel_valid.unsqueeze(1)
    # at_least counts relevant items too (r included); remove them to leave only the irrelevant ones.
    relevant_at_least = ((other >= this) & other_valid).sum(2)
    slots = torch.arange(rel_index.shape[1], device=scores.device)
    earlier = slots.view(1, 1, -1) < slots.view(1, -1, 1)
    relevant_before = (((other > this) | ((other == this) & earlier)) & other_valid).sum(2)

    ranks = 1 + (at_least - relevant_at_least) + relevant_before
    return ranks.masked_fill(~rel_valid, num_candidates + 1)


def _count_at_least(scores: Tensor, values: Tensor) -> Tensor:
    """``out[q, k] = #{j: scores[q, j] >= values[q, k]}``."""
    if values.shape[1] <= COMPARE_MAX_SLOTS:
        # A pass over the row per relevant slot is ~3x faster than sorting the row for 5 captions.
        return torch.stack([(scores >= values[:, k, None]).sum(1) for k in range(values.shape[1])], 1)
    ascending = scores.sort(dim=1).values
    return scores.shape[1] - torch.searchsorted(ascending, values, side="left")


def _summarise(ranks: Tensor, num_relevant: Tensor) -> dict[str, Tensor]:
    """Turn ``(Q, K)`` relevant ranks (padding sorts last) into the reported numbers."""
    ranks = ranks.sort(dim=1).values
    best = ranks[:, 0]
    # After sorting, the i-th relevant hit (1-based) sits at column i - 1. Padding is masked
    # explicitly because its rank N + 1 can itself be <= 10 when there are few candidates.
    hits = torch.arange(1, ranks.shape[1] + 1, device=ranks.device)
    counted = (ranks <= MAP_CUTOFF) & (hits <= num_relevant.unsqueeze(1))
    precision = torch.where(counted, hits / ranks.double(), 0.0)
    average_precision = precision.sum(1) / num_relevant

    ascending = best.sort().values
    middle = (ascending.numel() - 1) // 2, ascending.numel() // 2
    out = {f"R@{k}": (best <= k).double().mean() * 100 for k in RECALL_AT}
    out[f"mAP@{MAP_CUTOFF}"] = average_precision.mean() * 100
    out["medr"] = ((ascending[middle[0]] + ascending[middle[1]]) // 2).double()
    out["meanr"] = best.double().mean()
    return {name: value.float() for name, value in out.items()}


def _first_occurrence(keys: Tensor) -> Tensor:
    """Ascending positions of the first occurrence of each distinct value in ``keys``."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    positions = torch.arange(keys.numel(), device=keys.device)
    first = torch.full((unique.numel(),), keys.numel(), dtype=torch.long, device=keys.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    return first.sort().values


class AudioTextRetrieval(Metric):
    """T2A and A2T retrieval metrics (R@1/5/10, mAP@10, medr, meanr) over a whole evaluation set.

    Each ``update`` stores the batch's embeddings, so a validation loop can feed audios and captions
    in any grouping; ``compute`` gathers them from every process (list states reduced by ``cat``),
    deduplicates, and scores everything against everything with :func:`retrieval_metrics`, whose
    docstring defines the protocol, the pessimistic tie policy and the units (R@k and mAP@10 in
    percent, 0-100, as the papers report them; ranks 1-based).

    Deduplication exists because distributed samplers pad the last batch by repeating samples, so
    a gathered clip or caption can appear twice. Audios are deduplicated by id and captions by
    ``text_keys``, keeping the first occurrence. The caller must therefore give every caption a key
    that is unique across the whole evaluation set and identical wherever that caption is repeated,
    for example ``clip_index * 1000 + caption_index``. Keys rather than embedding rows identify
    captions because two different captions may embed identically (e.g. duplicated annotations),
    and because a repeated sample's embedding need not be bit-identical across processes.

    Args:
        chunk_size: queries scored at a time in ``compute``; lower it if 25k x 5k problems do not fit.
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    Example:
        >>> metric = AudioTextRetrieval()
        >>> audio = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
        >>> metric.update(audio, torch.tensor([0, 1]), audio.repeat_interleave(2, 0),
        ...               torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1000, 1001]))
        >>> metric.compute()["t2a/R@1"]
        tensor(100.)
    """

    is_differentiable = False
    higher_is_better = None  # recalls and mAP go up, ranks go down
    full_state_update = False

    def __init__(self, chunk_size: int = 1024, **kwargs) -> None:
        super().__init__(**kwargs)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        for name in ("audio_emb", "audio_ids", "text_emb", "text_ids", "text_keys"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        audio_emb: Tensor,
        audio_ids: Tensor,
        text_emb: Tensor,
        text_ids: Tensor,
        text_keys: Tensor,
    ) -> None:
        """Store a batch.

        Args:
            audio_emb: ``(Na, D)`` L2-normalised audio embeddings (``Na`` may be 0).
            audio_ids: ``(Na,)`` integer clip index of each audio.
            text_emb: ``(Nt, D)`` L2-normalised caption embeddings (``Nt`` may be 0).
            text_ids: ``(Nt,)`` clip index of the audio each caption describes.
            text_keys: ``(Nt,)`` integer key unique to each caption across the evaluation set.
        """
        if audio_emb.ndim != 2 or text_emb.ndim != 2:
            raise ValueError(
                f"embeddings must be 2-D, got {tuple(audio_emb.shape)} and {tuple(text_emb.shape)}"
            )
        if audio_ids.shape != (audio_emb.shape[0],):
            raise ValueError(
                f"audio_ids {tuple(audio_ids.shape)} does not match audio_emb {tuple(audio_emb.shape)}"
            )
        if text_ids.shape != (text_emb.shape[0],) or text_keys.shape != text_ids.shape:
            raise ValueError(
                f"text_ids {tuple(text_ids.shape)} and text_keys {tuple(text_keys.shape)} must both "
                f"match text_emb {tuple(text_emb.shape)}"
            )
        self.audio_emb.append(audio_emb.detach())
        self.audio_ids.append(audio_ids.detach().long())
        self.text_emb.append(text_emb.detach())
        self.text_ids.append(text_ids.detach().long())
        self.text_keys.append(text_keys.detach().long())

    def compute(self) -> dict[str, Tensor]:
        """Gathered, deduplicated metrics; keys as in :func:`retrieval_metrics`."""
        audio_ids = dim_zero_cat(self.audio_ids)
        text_keys = dim_zero_cat(self.text_keys)
        keep_audio = _first_occurrence(audio_ids)
        keep_text = _first_occurrence(text_keys)
        return retrieval_metrics(
            dim_zero_cat(self.audio_emb)[keep_audio],
            audio_ids[keep_audio],
            dim_zero_cat(self.text_emb)[keep_text],
            dim_zero_cat(self.text_ids)[keep_text],
            text_keys[keep_text],
            chunk_size=self.chunk_size,
        )
