"""Retrieval metrics for the evaluation suite: audio-text (AudioCaps / Clotho protocol, DESIGN.md
section 5), caption-caption, hard negatives, QA by retrieval and zero-shot classification.

The functions compute what the model scores; the torchmetrics wrappers at the end gather the
embeddings over processes and add each set's sizes (``n_audios``, ``n_texts``, ``n_queries``) and
the chance level of every recall and accuracy (``chance/<group>/<metric>``, see
:mod:`lightning_modules.chance`), so that a report can be read without knowing the set.

Every ranking metric is built on one streaming engine, :func:`_probe_counts`. For each query it
needs only a few "probe" candidates (the relevant items, a hard negative, the query itself when it
must be excluded) and, for each probe, how many candidates score at least as high. Those counts are
accumulated over blocks of candidates, so no more than ``chunk_size x block_size`` scores exist at
a time, and a 100k x 500k evaluation runs in bounded memory. Ranks are then the counts corrected for
the probes themselves, which is where the tie policy lives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_modules import chance
from lightning_modules.diagnostics import embedding_diagnostics

RECALL_AT: tuple[int, ...] = (1, 5, 10)
"""Cut-offs reported as ``R@k``."""

MAP_CUTOFF: int = 10
"""Cut-off of the reported ``mAP@10``."""

COMPARE_MAX_SLOTS: int = 8
"""Up to this many probes per query, counts come from direct comparisons; beyond, from sorting each
block of scores (cost independent of the number of probes)."""

SPARSE_MAX_FRACTION: float = 0.25
"""Counts come from the few candidates at or above a row's lowest probe score while their number
times the number of probes is at most this fraction of the block's scores."""


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def retrieval_metrics(
    audio_emb: Tensor,
    audio_ids: Tensor,
    text_emb: Tensor,
    text_ids: Tensor,
    text_keys: Tensor | None = None,
    chunk_size: int = 1024,
    block_size: int = 65536,
    names: tuple[str, str] = ("t2a", "a2t"),
    text_groups: Tensor | None = None,
    group_names: Sequence[str] = (),
) -> dict[str, Tensor]:
    """Text-to-audio and audio-to-text retrieval metrics over a whole evaluation set.

    A caption is relevant to the audio with the same id. Every caption is a T2A query with exactly
    one relevant audio; every audio is an A2T query whose relevant captions are all captions sharing
    its id (usually 5, any number >= 1 works). Similarity is the float32 dot product, so the
    embeddings should already be L2-normalised for it to be the cosine. The same protocol serves any
    paired modality: a speech-text set passes ``names=("t2s", "s2t")``.

    Ranks are 1-based, with ties resolved pessimistically: a relevant item's rank counts every
    irrelevant candidate that scores *greater than or equal to* it. Relevant items of the same query
    that tie with each other are ordered by caption key (or position when ``text_keys`` is ``None``),
    which keeps their ranks distinct; none of the reported numbers depends on that order because it
    only permutes which relevant caption gets which of the tied ranks. In full::

        rank(r) = 1 + #{irrelevant j: s_j >= s_r}
                    + #{relevant j != r: s_j > s_r or (s_j == s_r and j < r)}

    Reported values, all as 0-d float32 tensors under ``"<names[0]>/<name>"`` (text to audio) and
    ``"<names[1]>/<name>"`` (audio to text):

    - ``R@1``, ``R@5``, ``R@10``: percentage (0-100) of queries with a relevant item ranked <= k
      (for A2T: the best-ranked relevant caption).
    - ``mAP@10``: percentage (0-100). Per query, the relevant ranks r_1 < r_2 < ... are sorted
      ascending and AP@10 = sum over r_i <= 10 of (i / r_i), divided by the number of relevant items.
      For T2A this is the reciprocal rank truncated at 10. Sorting matters: LAION-CLAP pairs the
      i-th caption *in annotation order* with hit count i, which can even exceed 1.
    - ``medr``: median rank (of the best relevant item for A2T), floored when the count is even, the
      way CLAP-style evaluation code reports ``floor(median(0-based ranks)) + 1``.
    - ``meanr``: mean rank.

    With ``text_groups`` (the query type of each caption, e.g. question / keyphrase / paraphrase, as
    in Omni-Embed-Audio's user-intent evaluation), the text-to-audio numbers are also reported for
    each type's captions alone, under ``"<names[0]>/<type name>/<name>"``; a caption's rank does not
    depend on the other queries, so these are the overall numbers restricted to that type. Types
    without captions are left out.

    Args:
        audio_emb: ``(Na, D)`` audio embeddings.
        audio_ids: ``(Na,)`` integer clip ids, unique.
        text_emb: ``(Nt, D)`` caption embeddings.
        text_ids: ``(Nt,)`` clip id of each caption; each must match an audio, and every audio needs
            at least one caption.
        text_keys: optional ``(Nt,)`` unique caption keys, used only to order tied relevant captions
            independently of the order the captions arrive in.
        chunk_size: queries scored at a time.
        block_size: candidates scored at a time. At most ``chunk_size * block_size`` float32 scores
            exist at once (256 MB for the defaults); the results do not depend on either size.
        names: key prefixes for (text -> audio, audio -> text).
        text_groups: optional ``(Nt,)`` index into ``group_names`` of each caption's query type,
            -1 for none.
        group_names: names of the query types.

    Returns:
        ``R@1, R@5, R@10, mAP@10, medr, meanr`` under each of the two prefixes (and per query type).

    Raises:
        ValueError: on mismatched shapes, duplicate audio ids or caption keys, non-finite embeddings,
            a caption without its audio, an audio without captions, or query-type indices out of
            range.
    """
    _check_sizes(chunk_size, block_size)
    if len(names) != 2 or not all(isinstance(n, str) and n for n in names) or names[0] == names[1]:
        raise ValueError(f"names must be two different non-empty prefixes, got {names!r}")
    audio_emb, audio_ids = _check_embeddings("audio", audio_emb, audio_ids)
    text_emb, text_ids = _check_embeddings("caption", text_emb, text_ids)
    _check_same_dim(("audio", audio_emb), ("caption", text_emb))
    if audio_ids.unique().numel() != audio_ids.numel():
        raise ValueError("audio_ids must be unique; deduplicate gathered audios first")
    # Sorting both sides by clip id makes each query chunk's relevant items one contiguous stretch
    # of candidates, so the streaming engine finds them in one or two candidate blocks.
    if text_groups is not None:
        text_groups = _check_index("text_groups", text_groups, text_ids.numel(), len(group_names), allow_minus_one=True)
    audio_ids, by_id = audio_ids.sort()
    audio_emb = audio_emb[by_id]
    text_emb, text_ids, text_groups = _sort_captions(text_emb, text_ids, text_keys, text_groups)

    text_target = torch.searchsorted(audio_ids, text_ids).clamp(max=audio_ids.numel() - 1)
    if not torch.equal(audio_ids[text_target], text_ids):
        missing = text_ids[audio_ids[text_target] != text_ids].unique()
        raise ValueError(f"captions refer to audio ids without an audio: {missing[:10].tolist()}")
    clip_ids, starts, counts = _clip_blocks(text_ids)
    if clip_ids.numel() != audio_ids.numel():
        missing = audio_ids[~torch.isin(audio_ids, clip_ids)]
        raise ValueError(f"audio ids without any caption: {missing[:10].tolist()}")

    one = torch.ones_like(text_target)
    t2a_ranks = _relevant_ranks(
        text_emb, audio_emb, text_target.unsqueeze(1), one.bool().unsqueeze(1), None, chunk_size, block_size
    )
    # Audios and clip blocks are both in id order, so audio i's captions are block i.
    block_index, block_valid = _padded_blocks(starts, counts)
    a2t_ranks = _relevant_ranks(audio_emb, text_emb, block_index, block_valid, None, chunk_size, block_size)

    metrics = {}
    for prefix, summary in ((names[0], _summarise(t2a_ranks, one)), (names[1], _summarise(a2t_ranks, counts))):
        metrics.update({f"{prefix}/{name}": value for name, value in summary.items()})
    for index, group in enumerate(group_names if text_groups is not None else ()):
        members = text_groups == index
        if members.any():
            summary = _summarise(t2a_ranks[members], one[members])
            metrics.update({f"{names[0]}/{group}/{name}": value for name, value in summary.items()})
    return metrics


def text_text_metrics(
    text_emb: Tensor,
    text_ids: Tensor,
    text_keys: Tensor | None = None,
    chunk_size: int = 1024,
    block_size: int = 65536,
) -> dict[str, Tensor]:
    """Caption-to-caption retrieval: do captions of the same clip find each other?

    Every caption whose clip has at least two captions is a query. Its candidates are all *other*
    captions of the set: the query itself is excluded (neither relevant nor counted), and the
    relevant items are its siblings, the other captions of the same clip. Captions of single-caption
    clips are never queries but still compete as candidates. Scores, tie policy and the reported
    numbers are those of :func:`retrieval_metrics` (ranks 1-based and pessimistic, tied siblings
    ordered by key; R@k = percentage of queries whose best sibling ranks <= k; mAP@10 divides by the
    number of siblings; medr floored; meanr of the best sibling's rank).

    Args:
        text_emb: ``(Nt, D)`` caption embeddings.
        text_ids: ``(Nt,)`` integer clip id of each caption.
        text_keys: optional ``(Nt,)`` unique caption keys ordering tied siblings.
        chunk_size: queries scored at a time.
        block_size: candidates scored at a time (see :func:`retrieval_metrics`).

    Returns:
        ``t2t/R@1, t2t/R@5, t2t/R@10, t2t/mAP@10, t2t/medr, t2t/meanr`` as 0-d float32 tensors.

    Raises:
        ValueError: on bad shapes, non-finite embeddings, duplicate keys, or when no clip has two
            captions (there would be no query).
    """
    _check_sizes(chunk_size, block_size)
    text_emb, text_ids = _check_embeddings("caption", text_emb, text_ids)
    text_emb, text_ids, _ = _sort_captions(text_emb, text_ids, text_keys)
    clip_ids, starts, counts = _clip_blocks(text_ids)
    if counts.max() < 2:
        raise ValueError("caption-caption retrieval needs at least one clip with two or more captions")

    # Queries are the captions of multi-caption clips; each probes its whole clip block, in which
    # one slot is the query itself.
    clip_of = torch.repeat_interleave(torch.arange(clip_ids.numel(), device=counts.device), counts)
    queries = torch.nonzero(counts[clip_of] >= 2).squeeze(1)
    query_clip = clip_of[queries]
    probe_index, probe_valid = _padded_blocks(starts[query_clip], counts[query_clip])
    itself = probe_valid & (probe_index == queries.unsqueeze(1))
    ranks = _relevant_ranks(
        text_emb[queries], text_emb, probe_index, probe_valid & ~itself, itself, chunk_size, block_size
    )
    summary = _summarise(ranks, counts[query_clip] - 1)
    return {f"t2t/{name}": value for name, value in summary.items()}


def hard_negative_metrics(
    query_emb: Tensor,
    audio_emb: Tensor,
    target_index: Tensor,
    negative_index: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    block_size: int = 65536,
) -> dict[str, Tensor]:
    """Hard-negative retrieval (Omni-Embed-Audio, arXiv 2604.18360): does a text query rank its
    target audio above a deliberately confusable negative audio, among all audios?

    Each query i is scored (float32 dot product) against every row of ``audio_emb``. With 1-based
    ranks and ties against the model:

    - ``rank_target = 1 + #{j != target: s_j >= s_target}`` (pessimistic, as in retrieval);
    - ``rank_negative = 1 + #{j != negative: s_j > s_negative}``, so the hard negative wins a tie
      with any candidate, the target included.

    Reported values (0-d float32 tensors; percentages 0-100):

    - ``hn/HNSR@k``: hard-negative success rate, % of queries with ``rank_target <= k`` and
      ``rank_negative > k`` (target retrieved, negative not).
    - ``hn/R@k``: % of queries with ``rank_target <= k``, for reference.
    - ``hn/delta_rank_mean``, ``hn/delta_rank_median``: Δ-rank = ``rank_negative - rank_target``
      (positive when the target is ahead); the median of an even count is the mean of the two
      middle values.
    - ``hn/neg_above_target``: % of queries with Δ < 0.

    Args:
        query_emb: ``(M, D)`` query text embeddings.
        audio_emb: ``(Na, D)`` candidate audio embeddings.
        target_index: ``(M,)`` row of each query's target in ``audio_emb``.
        negative_index: ``(M,)`` row of each query's hard negative in ``audio_emb``.
        ks: cut-offs for ``HNSR@k`` and ``R@k``.
        chunk_size: queries scored at a time.
        block_size: candidates scored at a time (see :func:`retrieval_metrics`).

    Raises:
        ValueError: on bad shapes, non-finite embeddings, indices out of range, a target equal to its
            negative, or a non-positive ``k``.
    """
    _check_sizes(chunk_size, block_size)
    query_emb = _check_embeddings("hard-negative query", query_emb)[0]
    audio_emb = _check_embeddings("audio", audio_emb)[0]
    _check_same_dim(("query", query_emb), ("audio", audio_emb))
    target_index = _check_index("target_index", target_index, query_emb.shape[0], audio_emb.shape[0])
    negative_index = _check_index("negative_index", negative_index, query_emb.shape[0], audio_emb.shape[0])
    same = torch.nonzero(target_index == negative_index).squeeze(1)
    if same.numel():
        raise ValueError(f"target equals negative for queries {same[:10].tolist()}")
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")

    # Sorting by target keeps a chunk's targets close together, so fewer blocks hold probes.
    order = target_index.argsort()
    probes = torch.stack([target_index, negative_index], 1)[order]
    strict = torch.tensor([False, True], device=probes.device)
    counts = _probe_counts(
        query_emb[order], audio_emb, probes, torch.ones_like(probes, dtype=torch.bool), strict, chunk_size, block_size
    )[1]
    # The >= count of the target includes the target itself; the > count of the negative does not.
    rank_target, rank_negative = counts[:, 0], 1 + counts[:, 1]
    delta = (rank_negative - rank_target).double()

    out = {}
    for k in ks:
        out[f"hn/HNSR@{k}"] = ((rank_target <= k) & (rank_negative > k)).double().mean() * 100
        out[f"hn/R@{k}"] = (rank_target <= k).double().mean() * 100
    out["hn/delta_rank_mean"] = delta.mean()
    out["hn/delta_rank_median"] = _median(delta)
    out["hn/neg_above_target"] = (delta < 0).double().mean() * 100
    return {name: value.float() for name, value in out.items()}


def qa_accuracy(
    query_emb: Tensor,
    choice_emb: Tensor,
    choice_item: Tensor,
    answer_choice: Tensor,
    categories: Tensor | None = None,
    category_names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Multiple-choice QA answered by retrieval (MMAU-mini style, as in ALM2Vec): each question
    embedding scores (float32 dot product) its own answer choices, and the best-scoring choice is
    the model's answer.

    A question counts as correct iff its answer's score is *strictly* greater than every other
    choice of the same question; a tie with a wrong choice counts as wrong (the model did not
    single out the answer). A question with a single choice is always correct.

    Reported values (0-d float32 tensors, percentages 0-100):

    - ``qa/accuracy``: % of questions answered correctly.
    - ``qa/accuracy/<category name>``: the same within each category that has questions (categories
      without any are left out rather than reported as NaN).

    The chance level (the mean over questions of 1 / #choices) is added by
    :class:`QARetrievalAccuracy`.

    Args:
        query_emb: ``(Nq, D)`` question embeddings.
        choice_emb: ``(Nc, D)`` answer-choice embeddings.
        choice_item: ``(Nc,)`` question (row of ``query_emb``) each choice belongs to.
        answer_choice: ``(Nq,)`` row of ``choice_emb`` holding each question's correct answer; it
            must be one of that question's choices.
        categories: optional ``(Nq,)`` index into ``category_names`` per question, -1 for none.
        category_names: names of the categories; required with ``categories``.

    Raises:
        ValueError: on bad shapes, non-finite embeddings, out-of-range indices, or an answer that is
            not among its question's choices.
    """
    query_emb = _check_embeddings("question", query_emb)[0]
    choice_emb = _check_embeddings("choice", choice_emb)[0]
    _check_same_dim(("question", query_emb), ("choice", choice_emb))
    num_queries = query_emb.shape[0]
    choice_item = _check_index("choice_item", choice_item, choice_emb.shape[0], num_queries)
    answer_choice = _check_index("answer_choice", answer_choice, num_queries, choice_emb.shape[0])
    wrong_owner = torch.nonzero(choice_item[answer_choice] != torch.arange(num_queries, device=choice_item.device))
    if wrong_owner.numel():
        raise ValueError(
            f"answer_choice of questions {wrong_owner.squeeze(1)[:10].tolist()} points at choices of other questions"
        )
    if (categories is None) != (category_names is None):
        raise ValueError("categories and category_names must be given together")

    # Row-wise products give identical choices bit-identical scores, so ties are detected exactly.
    scores = (query_emb[choice_item] * choice_emb).sum(1)
    is_answer = torch.zeros_like(choice_item, dtype=torch.bool)
    is_answer[answer_choice] = True
    best_other = torch.full((num_queries,), -torch.inf, device=scores.device)
    best_other.scatter_reduce_(0, choice_item, scores.masked_fill(is_answer, -torch.inf), reduce="amax")
    correct = (scores[answer_choice] > best_other).double()

    out = {"qa/accuracy": correct.mean() * 100}
    if categories is not None:
        categories = _check_index("categories", categories, num_queries, len(category_names), allow_minus_one=True)
        for index, name in enumerate(category_names):
            members = categories == index
            if members.any():
                out[f"qa/accuracy/{name}"] = correct[members].mean() * 100
    return {name: value.float() for name, value in out.items()}


def zero_shot_metrics(
    audio_emb: Tensor, class_emb: Tensor, targets: Tensor, multi_label: bool, ks: Sequence[int] = (1, 5)
) -> dict[str, Tensor]:
    """Zero-shot classification (CLAP protocol, DESIGN.md section 9): every clip scores every class
    embedding (float32 dot product); ties count against the model.

    Single-label sets (ESC-50, UrbanSound8K, VGGSound; each row of ``targets`` has one class): the
    rank of a clip's class is ``1 + #{c != y: s_c >= s_y}``, and

    - ``zs/top<k>``: % of clips whose class ranks <= k (for each k of ``ks``; 100 when k >= #classes).

    Multi-label sets (AudioSet, FSD50K): for each class with at least one positive clip, the clips
    are ranked by their score for that class, a positive's rank counting every negative clip with
    an equal or higher score (positives tied with each other take consecutive ranks in either
    order, which the AP does not depend on). With the positives' ranks sorted, r_1 < r_2 < ...,
    AP = mean over i of i / r_i, and

    - ``zs/mAP``: % mean AP over the classes with positives (classes without any are left out:
      their AP is undefined, e.g. in a partial evaluation).

    The whole ``(clips, classes)`` score matrix is built at once (20k AudioSet clips x 527 classes
    is 42 MB in float32).

    Args:
        audio_emb: ``(N, D)`` clip embeddings.
        class_emb: ``(C, D)`` class embeddings.
        targets: ``(N, C)`` bool, ``targets[i, c]`` when clip i belongs to class c.
        multi_label: report ``zs/mAP`` (``True``) or ``zs/top<k>`` (``False``).
        ks: cut-offs of the single-label top-k accuracy.

    Raises:
        ValueError: on bad shapes, non-finite embeddings, a single-label row without exactly one
            class, a multi-label set without any positive, or a non-positive ``k``.
    """
    audio_emb = _check_embeddings("clip", audio_emb)[0]
    class_emb = _check_embeddings("class", class_emb)[0]
    _check_same_dim(("clip", audio_emb), ("class", class_emb))
    if targets.shape != (audio_emb.shape[0], class_emb.shape[0]):
        expected = (audio_emb.shape[0], class_emb.shape[0])
        raise ValueError(f"targets must have shape {expected}, got {tuple(targets.shape)}")
    targets = targets.bool()
    scores = audio_emb @ class_emb.T
    if not multi_label:
        if not bool((targets.sum(1) == 1).all()):
            raise ValueError("a single-label set needs exactly one class per clip")
        if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"ks must be positive integers, got {ks!r}")
        true_score = scores.gather(1, targets.long().argmax(1, keepdim=True))
        # The count includes the true class itself, so it is already 1 + #{others >= it}.
        rank = (scores >= true_score).sum(1)
        return {f"zs/top{k}": ((rank <= k).double().mean() * 100).float() for k in ks}
    positives = targets.sum(0)
    if not bool((positives > 0).any()):
        raise ValueError("no class has a positive clip")
    # Best first; at equal scores negatives go first (stable sorts: by label, then by score).
    by_label = torch.sort(targets.to(torch.uint8), dim=0, stable=True).indices
    by_score = torch.sort(scores.gather(0, by_label), dim=0, descending=True, stable=True).indices
    hit = targets.gather(0, by_label.gather(0, by_score)).double()
    rank = torch.arange(1, scores.shape[0] + 1, dtype=torch.float64, device=scores.device).unsqueeze(1)
    average_precision = (hit * hit.cumsum(0) / rank).sum(0)[positives > 0] / positives[positives > 0]
    return {"zs/mAP": (average_precision.mean() * 100).float()}


# ---------------------------------------------------------------------------------------------
# Validation and layout helpers
# ---------------------------------------------------------------------------------------------


def _check_sizes(chunk_size: int, block_size: int) -> None:
    if chunk_size < 1 or block_size < 1:
        raise ValueError(f"chunk_size and block_size must be >= 1, got {chunk_size} and {block_size}")


def _check_embeddings(what: str, emb: Tensor, ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Validate ``(N, D)`` embeddings and optional ``(N,)`` integer ids; return float32 / long copies."""
    if emb.ndim != 2:
        raise ValueError(f"{what} embeddings must be (N, D), got shape {tuple(emb.shape)}")
    if emb.shape[0] == 0:
        raise ValueError(f"no {what} embeddings: the set is empty")
    if ids is not None:
        if ids.shape != (emb.shape[0],):
            raise ValueError(
                f"{what} ids/indices must be 1-D with one entry per embedding row, got {tuple(ids.shape)} for "
                f"{emb.shape[0]} rows"
            )
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"{what} ids/indices must be an integer tensor, got {ids.dtype}")
        ids = ids.long()
    emb = emb.float()
    if not torch.isfinite(emb).all():
        raise ValueError(f"{what} embeddings contain NaN or inf, which would make every score meaningless")
    return emb, ids


def _check_same_dim(*named: tuple[str, Tensor]) -> None:
    if len({emb.shape[1] for _, emb in named}) != 1:
        shapes = ", ".join(f"{what} {tuple(emb.shape)}" for what, emb in named)
        raise ValueError(f"embeddings must share their dimension D, got {shapes}")


def _check_index(name: str, index: Tensor, length: int, bound: int, allow_minus_one: bool = False) -> Tensor:
    """Validate an integer ``(length,)`` tensor with values in ``[0, bound)`` (or -1 when allowed)."""
    if index.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(index.shape)}")
    if index.is_floating_point() or index.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {index.dtype}")
    index = index.long()
    low = -1 if allow_minus_one else 0
    bad = torch.nonzero((index < low) | (index >= bound)).squeeze(1)
    if bad.numel():
        raise ValueError(
            f"{name} out of range [{low}, {bound}) at positions {bad[:10].tolist()}: values {index[bad[:10]].tolist()}"
        )
    return index


def _sort_captions(
    text_emb: Tensor, text_ids: Tensor, text_keys: Tensor | None, extra: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Sort captions (and ``extra``, one entry per caption) by (clip id, key), so each clip's
    captions form one block in tie-break order."""
    if text_keys is not None:
        if text_keys.shape != text_ids.shape:
            raise ValueError(f"text_keys shape {tuple(text_keys.shape)} != text_ids shape {tuple(text_ids.shape)}")
        if text_keys.is_floating_point():
            raise ValueError("text_keys must be an integer tensor")
        if text_keys.unique().numel() != text_keys.numel():
            raise ValueError("text_keys must be unique; deduplicate gathered captions first")
        by_key = text_keys.argsort()
        text_emb, text_ids = text_emb[by_key], text_ids[by_key]
        extra = None if extra is None else extra[by_key]
    # Stable, so the key order survives within a clip.
    by_id = torch.sort(text_ids, stable=True).indices
    return text_emb[by_id], text_ids[by_id], None if extra is None else extra[by_id]


def _clip_blocks(sorted_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Distinct ids of a sorted id tensor with the start and length of each one's block."""
    clip_ids, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    return clip_ids, counts.cumsum(0) - counts, counts


def _padded_blocks(starts: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """``(Q, max count)`` indices ``start + slot`` and their validity; padding is clamped in range."""
    slots = torch.arange(int(counts.max()), device=counts.device)
    index = starts.unsqueeze(1) + slots
    valid = slots < counts.unsqueeze(1)
    return torch.where(valid, index, starts.unsqueeze(1)), valid


# ---------------------------------------------------------------------------------------------
# Streaming engine
# ---------------------------------------------------------------------------------------------


def _probe_counts(
    queries: Tensor,
    candidates: Tensor,
    probe_index: Tensor,
    probe_valid: Tensor,
    strict: Tensor,
    chunk_size: int,
    block_size: int,
) -> tuple[Tensor, Tensor]:
    """Scores of each query's probe candidates and how many candidates score at least as high.

    For query ``q`` and probe slot ``p`` with ``v = s[q, probe_index[q, p]]``::

        counts[q, p] = #{j: s[q, j] >= v}    (#{j: s[q, j] > v} where ``strict[.., p]``)

    over all candidates ``j``, the probe itself included. Scores are float32 ``queries @
    candidates.T``, computed ``chunk_size`` queries by ``block_size`` candidates at a time, in two
    passes per query chunk:

    1. score only the candidate blocks that hold a valid probe of the chunk and gather the probe
       scores from them. Because the counting pass runs the very same block product, a probe's
       score is bit-identical to its own entry and to every equal score the count sees, which is
       what lets callers subtract probes from the counts exactly;
    2. for every block, add the number of scores at or above each probe's threshold. ``s > v`` is
       ``s >= nextafter(v, +inf)`` on floats, so strict probes just use a raised threshold.

    The block last scored in pass 1 is counted first and then freed, so at most one block of
    ``chunk_size x block_size`` scores exists at a time and the common single-block case scores
    each pair once. The counts are the same for every ``chunk_size`` and ``block_size`` as long as
    the matrix product gives each pair the same float32 value at every size, which holds exactly
    when the products are exact (e.g. small integer-valued embeddings).

    Args:
        queries: ``(Q, D)`` float32.
        candidates: ``(N, D)`` float32.
        probe_index: ``(Q, P)`` candidate rows; invalid slots may hold any in-range index.
        probe_valid: ``(Q, P)`` bool; invalid slots get score 0 and meaningless counts.
        strict: ``(P,)`` or ``(Q, P)`` bool.

    Returns:
        ``probe_scores (Q, P)`` float32 and ``counts (Q, P)`` int64.
    """
    num_queries, num_probes = probe_index.shape
    device = candidates.device
    strict = strict.expand(num_queries, num_probes)
    probe_scores = torch.zeros(num_queries, num_probes, device=device)
    counts = torch.zeros(num_queries, num_probes, dtype=torch.long, device=device)
    block_starts = range(0, candidates.shape[0], block_size)
    for begin in range(0, num_queries, chunk_size):
        rows = slice(begin, begin + chunk_size)
        chunk, index, valid = queries[rows], probe_index[rows], probe_valid[rows]
        block_of = index.div(block_size, rounding_mode="floor") * block_size

        # Pass 1: probe scores from the blocks that hold probes.
        scores = torch.zeros(index.shape, device=device)
        held, held_start = None, None
        for start in block_of[valid].unique().tolist():
            held = None  # drop the previous block before scoring the next
            held = chunk @ candidates[start : start + block_size].T
            held_start = start
            local = (index - start).clamp(0, held.shape[1] - 1)
            scores = torch.where(valid & (block_of == start), held.gather(1, local), scores)
        thresholds = torch.where(strict[rows], torch.nextafter(scores, torch.full_like(scores, torch.inf)), scores)

        # Pass 2: counts over every block, reusing the one still held.
        total = torch.zeros(index.shape, dtype=torch.long, device=device)
        if held is not None:
            total += _count_at_least(held, thresholds)
            del held
        for start in block_starts:
            if start != held_start:
                total += _count_at_least(chunk @ candidates[start : start + block_size].T, thresholds)
        probe_scores[rows], counts[rows] = scores, total
    return probe_scores, counts


def _count_at_least(scores: Tensor, values: Tensor) -> Tensor:
    """``out[q, k] = #{j: scores[q, j] >= values[q, k]}`` for one block of scores.

    Every counted score is at or above its row's lowest threshold, so one comparison pass finds the
    candidates that matter ("survivors"). For a model that ranks relevant items high they are few,
    and comparing only them with every threshold beats one pass per threshold (~4x for 5 captions).
    When survivors are many, the whole block is compared per threshold, or sorted once for many
    thresholds.
    """
    above = scores >= values.min(1, keepdim=True).values
    if values.shape[1] == 1:
        return above.sum(1, dtype=torch.int32).long().unsqueeze(1)
    # The survivor path allocates ~(4 + 8 / P) bytes per survivor and threshold; the bound keeps that
    # within the size of the score block itself.
    if int(above.sum()) * values.shape[1] <= SPARSE_MAX_FRACTION * scores.numel():
        rows, cols = above.nonzero(as_tuple=True)
        hits = (scores[rows, cols].unsqueeze(1) >= values[rows]).int()
        return torch.zeros(values.shape, dtype=torch.int32, device=values.device).index_add_(0, rows, hits).long()
    if values.shape[1] <= COMPARE_MAX_SLOTS:
        # A pass over the row per threshold is ~3x faster than sorting the row for 5 thresholds;
        # int32 sums (a block count always fits) are ~1.6x faster than the default int64.
        return torch.stack(
            [(scores >= values[:, k, None]).sum(1, dtype=torch.int32) for k in range(values.shape[1])], 1
        ).long()
    ascending = scores.sort(dim=1).values
    return scores.shape[1] - torch.searchsorted(ascending, values, side="left")


def _relevant_ranks(
    queries: Tensor,
    candidates: Tensor,
    probe_index: Tensor,
    relevant: Tensor,
    excluded: Tensor | None,
    chunk_size: int,
    block_size: int,
) -> Tensor:
    """Ranks ``(Q, P)`` of each query's relevant probes under the tie policy of
    :func:`retrieval_metrics`, with ``excluded`` probes removed from the candidates altogether.

    Slots that are not relevant get rank ``N + 1`` for ``N`` candidates, so they sort after every
    real rank.
    """
    counted = relevant if excluded is None else relevant | excluded
    strict = torch.zeros(probe_index.shape[1], dtype=torch.bool, device=probe_index.device)
    scores, at_least = _probe_counts(queries, candidates, probe_index, counted, strict, chunk_size, block_size)

    slots = torch.arange(probe_index.shape[1], device=probe_index.device)
    earlier = slots.view(1, 1, -1) < slots.view(1, -1, 1)
    ranks = []
    # The pairwise (chunk, P, P) comparisons are chunked too: P can be large for clips with many captions.
    for begin in range(0, queries.shape[0], chunk_size):
        rows = slice(begin, begin + chunk_size)
        this = scores[rows].unsqueeze(2)  # probe r, (Q, P, 1)
        other = scores[rows].unsqueeze(1)  # probe j, (Q, 1, P)
        # at_least counts every counted probe at or above r (r itself included); what remains are the
        # irrelevant candidates. Relevant ones ahead of r are added back with the key-order tie-break.
        probes_at_least = ((other >= this) & counted[rows].unsqueeze(1)).sum(2)
        relevant_before = (((other > this) | ((other == this) & earlier)) & relevant[rows].unsqueeze(1)).sum(2)
        ranks.append(1 + at_least[rows] - probes_at_least + relevant_before)
    return torch.cat(ranks).masked_fill(~relevant, candidates.shape[0] + 1)


def _summarise(ranks: Tensor, num_relevant: Tensor) -> dict[str, Tensor]:
    """Turn ``(Q, P)`` relevant ranks (non-relevant slots sort last) into the reported numbers."""
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


def _median(values: Tensor) -> Tensor:
    """Median of a 1-D tensor; the mean of the two middle values for an even count."""
    ascending = values.sort().values
    return (ascending[(values.numel() - 1) // 2] + ascending[values.numel() // 2]) / 2


def _first_occurrence(keys: Tensor) -> Tensor:
    """Ascending positions of the first occurrence of each distinct value in ``keys``."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    positions = torch.arange(keys.numel(), device=keys.device)
    first = torch.full((unique.numel(),), keys.numel(), dtype=torch.long, device=keys.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    return first.sort().values


def _rows_of(ids: Tensor, sorted_ids: Tensor, order: Tensor, what: str, where: str) -> Tensor:
    """Rows (via ``order``) at which each of ``ids`` sits in ``sorted_ids``; ValueError naming the
    first one that is absent."""
    slot = torch.searchsorted(sorted_ids, ids).clamp(max=sorted_ids.numel() - 1)
    missing = ids[sorted_ids[slot] != ids]
    if missing.numel():
        raise ValueError(f"{what} {missing[0].item()} is not among {where} ({missing.numel()} missing in all)")
    return order[slot]


# ---------------------------------------------------------------------------------------------
# torchmetrics wrappers
# ---------------------------------------------------------------------------------------------


def _require_updates(metric: Metric, state: list[Tensor] | Tensor) -> None:
    # A list state is still a list when nothing was stored (after a distributed sync it is a tensor).
    if isinstance(state, list) and not state:
        raise ValueError(f"{type(metric).__name__} has no stored data: call update() before compute()")


class AudioTextRetrieval(Metric):
    """Retrieval metrics of a paired audio-text (or speech-text) evaluation set, gathered over
    processes: R@1/5/10, mAP@10, medr and meanr in both directions, optionally caption-caption
    retrieval, embedding diagnostics and hard-negative metrics.

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

    Hard negatives are scored by :meth:`compute_with`, not by arguments to ``compute``:
    torchmetrics' wrapper around ``compute`` caches its first result and returns it for any later
    call whatever the arguments, so a ``compute(hard_negatives=...)`` after a plain ``compute()``
    would silently drop them. :meth:`compute_with` gathers the states through the same
    ``sync_context`` the wrapper uses and never touches that cache.

    Besides the metrics, the results hold the set's sizes after deduplication (``n_audios``,
    ``n_texts``; with hard negatives ``n_queries``, the triples scored) and the chance level of
    every recall, mAP@10 and mean rank (``chance/t2a/R@1``, ``chance/a2t/mAP@10``,
    ``chance/hn/HNSR@1``, ...; :mod:`lightning_modules.chance`): T2A has ``n_audios`` candidates
    and one relevant, A2T ``n_texts`` candidates and the clip's captions relevant, caption-caption
    ``n_texts - 1`` candidates and the siblings relevant.

    Args:
        chunk_size: queries scored at a time.
        block_size: candidates scored at a time (see :func:`retrieval_metrics`).
        names: key prefixes for (text -> audio, audio -> text), e.g. ``("t2s", "s2t")``.
        text_text: also report caption-caption retrieval (:func:`text_text_metrics`, ``t2t/...``).
        diagnostics: also report :func:`~lightning_modules.diagnostics.embedding_diagnostics`
            (``diag/...``).
        query_types: names of the captions' query types; ``update`` then takes each caption's type
            index and T2A is also reported per type (``t2a/<type>/R@1``, ...).
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

    def __init__(
        self,
        chunk_size: int = 1024,
        block_size: int = 65536,
        names: tuple[str, str] = ("t2a", "a2t"),
        text_text: bool = False,
        diagnostics: bool = False,
        query_types: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        _check_sizes(chunk_size, block_size)
        self.chunk_size = chunk_size
        self.block_size = block_size
        self.names = tuple(names)
        self.text_text = text_text
        self.diagnostics = diagnostics
        self.query_types = None if query_types is None else list(query_types)
        for name in ("audio_emb", "audio_ids", "text_emb", "text_ids", "text_keys", "text_groups"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        audio_emb: Tensor,
        audio_ids: Tensor,
        text_emb: Tensor,
        text_ids: Tensor,
        text_keys: Tensor,
        text_groups: Tensor | None = None,
    ) -> None:
        """Store a batch.

        Args:
            audio_emb: ``(Na, D)`` L2-normalised audio embeddings (``Na`` may be 0).
            audio_ids: ``(Na,)`` integer clip index of each audio.
            text_emb: ``(Nt, D)`` L2-normalised caption embeddings (``Nt`` may be 0).
            text_ids: ``(Nt,)`` clip index of the audio each caption describes.
            text_keys: ``(Nt,)`` integer key unique to each caption across the evaluation set.
            text_groups: ``(Nt,)`` index into ``query_types`` of each caption, -1 for none; given
                exactly when the metric has ``query_types``.
        """
        if audio_emb.ndim != 2 or text_emb.ndim != 2:
            raise ValueError(f"embeddings must be 2-D, got {tuple(audio_emb.shape)} and {tuple(text_emb.shape)}")
        if audio_ids.shape != (audio_emb.shape[0],):
            raise ValueError(f"audio_ids {tuple(audio_ids.shape)} does not match audio_emb {tuple(audio_emb.shape)}")
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
        if (text_groups is None) != (self.query_types is None):
            raise ValueError("text_groups must be given exactly when the metric has query_types")
        if text_groups is not None:
            if text_groups.shape != text_ids.shape:
                raise ValueError(
                    f"text_groups {tuple(text_groups.shape)} does not match text_ids {tuple(text_ids.shape)}"
                )
            self.text_groups.append(text_groups.detach().long())

    def compute(self) -> dict[str, Tensor]:
        """Gathered, deduplicated metrics: :func:`retrieval_metrics`, plus ``t2t/...`` and
        ``diag/...`` when enabled, sizes and chance levels. Hard negatives need :meth:`compute_with`."""
        return self._evaluate(None)

    def compute_with(
        self, hard_negatives: tuple[Tensor, Tensor, Tensor] | None = None, drop_missing: bool = False
    ) -> dict[str, Tensor]:
        """:meth:`compute`, plus ``hn/...`` (:func:`hard_negative_metrics`) when ``hard_negatives``
        is given.

        Args:
            hard_negatives: ``(query_emb (M, D), target_ids (M,), negative_ids (M,))`` where the ids
                are clip ids, the same integers as the ``audio_ids`` passed to ``update``; each is
                mapped to its deduplicated audio row. The tuple is used as given, not gathered: pass
                the complete set on every process.
            drop_missing: leave out the triples whose target or negative was not embedded (a partial
                evaluation: ``limit_test_batches``, the sanity check, clips skipped at decode time)
                instead of raising; ``n_queries`` counts the triples scored, and no ``hn/`` key is
                reported when none is left.

        Raises:
            ValueError: naming a target or negative id that is not among the gathered audios
                (unless ``drop_missing``).
        """
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        ):
            return self._evaluate(hard_negatives, drop_missing)

    def _evaluate(
        self, hard_negatives: tuple[Tensor, Tensor, Tensor] | None, drop_missing: bool = False
    ) -> dict[str, Tensor]:
        _require_updates(self, self.audio_ids)
        audio_ids = dim_zero_cat(self.audio_ids)
        text_keys = dim_zero_cat(self.text_keys)
        keep_audio = _first_occurrence(audio_ids)
        keep_text = _first_occurrence(text_keys)
        audio_emb, audio_ids = dim_zero_cat(self.audio_emb)[keep_audio], audio_ids[keep_audio]
        text_emb, text_ids = dim_zero_cat(self.text_emb)[keep_text], dim_zero_cat(self.text_ids)[keep_text]
        text_keys = text_keys[keep_text]
        groups = {}
        if self.query_types is not None:
            groups = {"text_groups": dim_zero_cat(self.text_groups)[keep_text], "group_names": self.query_types}
        sizes = {"chunk_size": self.chunk_size, "block_size": self.block_size}
        out = retrieval_metrics(
            audio_emb, audio_ids, text_emb, text_ids, text_keys, names=self.names, **sizes, **groups
        )
        num_audios, num_texts = audio_ids.numel(), text_ids.numel()
        out.update(_size_values(n_audios=num_audios, n_texts=num_texts))
        captions = torch.unique(text_ids, return_counts=True)[1]  # per audio: retrieval_metrics checked both ways
        out.update(_retrieval_chance(self.names[0], num_audios, torch.ones(num_texts)))
        out.update(_retrieval_chance(self.names[1], num_texts, captions))
        if self.text_text:
            out.update(text_text_metrics(text_emb, text_ids, text_keys, **sizes))
            siblings = (captions - 1).repeat_interleave(captions)
            out.update(_retrieval_chance("t2t", num_texts - 1, siblings[siblings > 0]))
        if self.diagnostics:
            out.update(embedding_diagnostics(audio_emb, audio_ids, text_emb, text_ids))
        if hard_negatives is not None:
            if len(hard_negatives) != 3:
                raise ValueError("hard_negatives must be a tuple (query_emb, target_ids, negative_ids)")
            query_emb, target_ids, negative_ids = hard_negatives
            target_ids, negative_ids = target_ids.long().to(audio_ids.device), negative_ids.long().to(audio_ids.device)
            if drop_missing:
                present = torch.isin(target_ids, audio_ids) & torch.isin(negative_ids, audio_ids)
                query_emb, target_ids, negative_ids = query_emb[present], target_ids[present], negative_ids[present]
            out.update(_size_values(n_queries=target_ids.numel()))
            if not target_ids.numel():
                return out
            sorted_ids, order = audio_ids.sort()
            where = "the gathered audio ids"
            rows = [
                _rows_of(ids.long().to(audio_ids.device), sorted_ids, order, f"hard-negative {what} id", where)
                for what, ids in (("target", target_ids), ("negative", negative_ids))
            ]
            out.update(hard_negative_metrics(query_emb, audio_emb, *rows, **sizes))
            for k in RECALL_AT:
                out[f"chance/hn/HNSR@{k}"] = (chance.hard_negative_success(num_audios, k) * 100).float()
                out[f"chance/hn/R@{k}"] = (chance.recall_at_k(num_audios, 1, k) * 100).float()
        return out


class QARetrievalAccuracy(Metric):
    """Multiple-choice QA by retrieval (:func:`qa_accuracy`), gathered over processes.

    Questions and answer choices arrive in batches, each choice tagged with its question's item
    index and a key unique to the choice (e.g. ``item_index * 1000 + j``); each question names the
    key of its correct answer. ``compute`` gathers everything (list states reduced by ``cat``),
    deduplicates questions by item index and choices by key, because distributed samplers repeat
    items to pad the last batch (see :class:`AudioTextRetrieval`), and reports ``qa/accuracy`` and
    ``qa/accuracy/<category>`` in percent, with their chance levels (``chance/qa/accuracy...``, the
    mean over the questions of 1 / #choices) and the sizes (``n_audios`` = ``n_queries``: the
    questions, each with its clip; ``n_texts``: the choices).

    Args:
        category_names: names indexed by ``category_index``; ``None`` reports no per-category
            accuracy.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, category_names: list[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.category_names = None if category_names is None else list(category_names)
        for name in ("query_emb", "query_index", "choice_emb", "choice_index", "choice_key", "answer_key", "category"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        query_emb: Tensor,
        query_index: Tensor,
        choice_emb: Tensor,
        choice_index: Tensor,
        choice_key: Tensor,
        answer_key: Tensor,
        category_index: Tensor,
    ) -> None:
        """Store a batch.

        Args:
            query_emb: ``(Nq, D)`` question embeddings.
            query_index: ``(Nq,)`` item index of each question in the QA set.
            choice_emb: ``(Nc, D)`` answer-choice embeddings.
            choice_index: ``(Nc,)`` item index of the question each choice belongs to.
            choice_key: ``(Nc,)`` key unique to each choice across the set.
            answer_key: ``(Nq,)`` ``choice_key`` of each question's correct answer.
            category_index: ``(Nq,)`` index into ``category_names``, -1 for none.
        """
        if query_emb.ndim != 2 or choice_emb.ndim != 2:
            raise ValueError(f"embeddings must be 2-D, got {tuple(query_emb.shape)} and {tuple(choice_emb.shape)}")
        per_query = {"query_index": query_index, "answer_key": answer_key, "category_index": category_index}
        per_choice = {"choice_index": choice_index, "choice_key": choice_key}
        for rows, tensors in ((query_emb.shape[0], per_query), (choice_emb.shape[0], per_choice)):
            for name, tensor in tensors.items():
                if tensor.shape != (rows,):
                    raise ValueError(f"{name} must have shape ({rows},), got {tuple(tensor.shape)}")
        self.query_emb.append(query_emb.detach())
        self.query_index.append(query_index.detach().long())
        self.choice_emb.append(choice_emb.detach())
        self.choice_index.append(choice_index.detach().long())
        self.choice_key.append(choice_key.detach().long())
        self.answer_key.append(answer_key.detach().long())
        self.category.append(category_index.detach().long())

    def compute(self) -> dict[str, Tensor]:
        """Gathered, deduplicated :func:`qa_accuracy`."""
        _require_updates(self, self.query_index)
        query_index = dim_zero_cat(self.query_index)
        choice_key = dim_zero_cat(self.choice_key)
        keep_query = _first_occurrence(query_index)
        keep_choice = _first_occurrence(choice_key)
        query_index, choice_key = query_index[keep_query], choice_key[keep_choice]
        choice_index = dim_zero_cat(self.choice_index)[keep_choice]
        answer_key = dim_zero_cat(self.answer_key)[keep_query]

        sorted_items, item_order = query_index.sort()
        choice_item = _rows_of(choice_index, sorted_items, item_order, "choice item index", "the question items")
        sorted_keys, key_order = choice_key.sort()
        answer_choice = _rows_of(answer_key, sorted_keys, key_order, "answer key", "the choice keys of any item")
        owner = choice_item[answer_choice]
        foreign = torch.nonzero(owner != torch.arange(owner.numel(), device=owner.device))
        if foreign.numel():
            item = query_index[foreign[0, 0]].item()
            raise ValueError(
                f"answer key {answer_key[foreign[0, 0]].item()} of item {item} is not among that item's choices"
            )
        categories = None
        if self.category_names is not None:
            categories = dim_zero_cat(self.category)[keep_query]
        out = qa_accuracy(
            dim_zero_cat(self.query_emb)[keep_query],
            dim_zero_cat(self.choice_emb)[keep_choice],
            choice_item,
            answer_choice,
            categories,
            self.category_names,
        )
        questions = query_index.numel()
        out.update(_size_values(n_audios=questions, n_texts=choice_key.numel(), n_queries=questions))
        guess = 1 / torch.bincount(choice_item, minlength=query_index.numel()).double()
        out["chance/qa/accuracy"] = (guess.mean() * 100).float()
        for index, name in enumerate(self.category_names or ()):
            if f"qa/accuracy/{name}" in out:
                out[f"chance/qa/accuracy/{name}"] = (guess[categories == index].mean() * 100).float()
        return out


class ZeroShotClassification(Metric):
    """Zero-shot classification (:func:`zero_shot_metrics`), gathered over processes.

    Clip embeddings arrive in batches with their clip index and their ``(B, C)`` multi-hot targets;
    the class embeddings are computed once per evaluation (the class prompts, on every process
    alike) and passed to :meth:`compute_with`, which gathers the clips (list states reduced by
    ``cat``), deduplicates them by clip index (distributed samplers repeat clips to pad the last
    batch) and reports ``zs/top1``, ``zs/top5`` (single-label) or ``zs/mAP`` (multi-label) in
    percent, with their chance levels (``chance/zs/top<k>`` = min(k, C) / C; ``chance/zs/mAP`` the
    mean over the classes with positives of the expected AP of a random clip order) and the sizes
    (``n_audios`` = ``n_queries``: the clips; ``n_texts``: the classes).

    Args:
        multi_label: multi-label set (``zs/mAP``) or single-label (``zs/top<k>``).
        ks: cut-offs of the single-label top-k accuracy.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, multi_label: bool, ks: Sequence[int] = (1, 5), **kwargs) -> None:
        super().__init__(**kwargs)
        self.multi_label = multi_label
        self.ks = tuple(ks)
        for name in ("audio_emb", "clip_index", "targets"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, audio_emb: Tensor, clip_index: Tensor, targets: Tensor) -> None:
        """Store a batch: ``(B, D)`` clip embeddings, ``(B,)`` clip indices, ``(B, C)`` bool targets."""
        if audio_emb.ndim != 2 or clip_index.shape != (audio_emb.shape[0],) or targets.shape[:1] != clip_index.shape:
            raise ValueError(
                f"expected (B, D) embeddings, (B,) clip indices and (B, C) targets, got {tuple(audio_emb.shape)}, "
                f"{tuple(clip_index.shape)} and {tuple(targets.shape)}"
            )
        self.audio_emb.append(audio_emb.detach())
        self.clip_index.append(clip_index.detach().long())
        # uint8, not bool: every collective backend gathers bytes.
        self.targets.append(targets.detach().to(torch.uint8))

    def compute(self) -> dict[str, Tensor]:
        raise TypeError("zero-shot classification needs the class embeddings: call compute_with(class_emb)")

    def compute_with(self, class_emb: Tensor) -> dict[str, Tensor]:
        """Gathered, deduplicated :func:`zero_shot_metrics` against ``(C, D)`` class embeddings
        (used as given: pass the same on every process), with sizes and chance levels."""
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        ):
            _require_updates(self, self.clip_index)
            keep = _first_occurrence(dim_zero_cat(self.clip_index))
            audio_emb = dim_zero_cat(self.audio_emb)[keep]
            targets = dim_zero_cat(self.targets)[keep].bool()
        out = zero_shot_metrics(audio_emb, class_emb.to(audio_emb.device), targets, self.multi_label, self.ks)
        num_clips, num_classes = targets.shape
        out.update(_size_values(n_audios=num_clips, n_texts=num_classes, n_queries=num_clips))
        if self.multi_label:
            positives = targets.sum(0)
            expected = chance.average_precision(num_clips, positives[positives > 0])
            out["chance/zs/mAP"] = (expected.mean() * 100).float()
        else:
            for k in self.ks:
                out[f"chance/zs/top{k}"] = torch.tensor(100 * min(k, num_classes) / num_classes)
        return out


def _size_values(**sizes: int) -> dict[str, Tensor]:
    """Set sizes as float tensors, like every other logged value."""
    return {name: torch.tensor(float(value)) for name, value in sizes.items()}


def _retrieval_chance(prefix: str, num_candidates: int, num_relevant: Tensor) -> dict[str, Tensor]:
    """Chance levels of ``R@k``, ``mAP@10`` and ``meanr`` over queries with ``num_relevant`` each."""
    n, m = num_candidates, num_relevant
    out = {f"chance/{prefix}/R@{k}": chance.recall_at_k(n, m, k).mean() * 100 for k in RECALL_AT}
    out[f"chance/{prefix}/mAP@{MAP_CUTOFF}"] = chance.average_precision(n, m, MAP_CUTOFF).mean() * 100
    out[f"chance/{prefix}/meanr"] = chance.mean_best_rank(n, m).mean()
    return {name: value.float() for name, value in out.items()}


def score_matrix_metrics(scores: Tensor, relevant: Tensor, prefix: str, chunk_size: int = 256) -> dict[str, Tensor]:
    """The metrics of :func:`retrieval_metrics` (same tie policy, same numbers) for an explicit
    ``(Q, C)`` score matrix, e.g. embedding similarities fused with re-ranker scores.

    ``relevant`` is the ``(Q, C)`` boolean relevance; every query needs at least one relevant
    candidate. Relevant candidates of one query that tie are ordered by column. Keys are
    ``"<prefix>/R@1"`` ... ``"<prefix>/meanr"``.
    """
    if scores.shape != relevant.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and relevant {tuple(relevant.shape)} must be the same (Q, C)")
    num_relevant = relevant.sum(1)
    if bool((num_relevant == 0).any()):
        raise ValueError("every query needs at least one relevant candidate")
    width = int(num_relevant.max())
    # The relevant columns of each row first, in column order (a stable sort of the relevance flags).
    probes = (~relevant).to(torch.uint8).argsort(dim=1, stable=True)[:, :width]
    valid = relevant.gather(1, probes)
    slots = torch.arange(width, device=scores.device)
    earlier = slots.view(1, 1, -1) < slots.view(1, -1, 1)
    ranks = []
    for begin in range(0, scores.shape[0], chunk_size):
        rows = slice(begin, begin + chunk_size)
        block, rel = scores[rows], relevant[rows]
        probe_scores = block.gather(1, probes[rows])  # (q, P)
        irrelevant_at_least = ((block.unsqueeze(1) >= probe_scores.unsqueeze(2)) & ~rel.unsqueeze(1)).sum(2)
        this, other = probe_scores.unsqueeze(2), probe_scores.unsqueeze(1)
        relevant_before = (((other > this) | ((other == this) & earlier)) & valid[rows].unsqueeze(1)).sum(2)
        ranks.append(1 + irrelevant_at_least + relevant_before)
    ranks = torch.cat(ranks).masked_fill(~valid, scores.shape[1] + 1)
    return {f"{prefix}/{name}": value for name, value in _summarise(ranks, num_relevant).items()}
