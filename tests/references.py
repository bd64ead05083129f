"""Brute-force references for the evaluation metrics: Python loops over queries, float64 scores,
candidates ranked by sorting with an explicit key. They follow the protocol of the design notes
(section 5: AudioCaps / Clotho retrieval; section 9: zero-shot classification) and the tie policy the
metrics document: among equal scores, irrelevant candidates go first (ties count against the model).

Tests compare the project's vectorised, streamed metrics against these, never against each other.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np
import torch

RECALL_AT = (1, 5, 10)


def ranked(candidates, score, relevant, tie_index) -> list:
    """Candidates best first. Among equal scores irrelevant ones go first (pessimistic), and tied
    relevant ones follow ``tie_index``."""
    return sorted(candidates, key=lambda j: (-score[j], j in relevant, tie_index[j]))


def summary(best_ranks: Sequence[int], average_precisions: Sequence[float]) -> dict[str, float]:
    """R@1/5/10 and mAP@10 in percent, median rank (rounded down) and mean rank."""
    out = {f"R@{k}": 100 * sum(r <= k for r in best_ranks) / len(best_ranks) for k in RECALL_AT}
    out["mAP@10"] = 100 * sum(average_precisions) / len(average_precisions)
    out["medr"] = math.floor(statistics.median(best_ranks))
    out["meanr"] = sum(best_ranks) / len(best_ranks)
    return out


def average_precision_at_10(ranks: Sequence[int]) -> float:
    """(Σ over relevant items ranked ≤ 10 of hits so far / rank) / number of relevant items, with the
    relevant items' ranks in ascending order."""
    ranks = sorted(ranks)
    return sum((i + 1) / r for i, r in enumerate(ranks) if r <= 10) / len(ranks)


def t2a_ranks(audio_emb, audio_ids, text_emb, text_ids) -> list[int]:
    """For every caption (query), the 1-based rank of its one audio among all audios."""
    scores = (text_emb.double() @ audio_emb.double().T).tolist()  # [caption][audio]
    audio_ids, text_ids = audio_ids.tolist(), text_ids.tolist()
    audios = list(range(len(audio_ids)))
    ranks = []
    for q in range(len(text_ids)):
        relevant = {i for i in audios if audio_ids[i] == text_ids[q]}
        assert len(relevant) == 1, "every caption needs exactly one audio"
        order = ranked(audios, scores[q], relevant, audios)
        ranks.append(order.index(next(iter(relevant))) + 1)
    return ranks


def retrieval_reference(audio_emb, audio_ids, text_emb, text_ids, text_keys=None, sort_ranks=True,
                        names=("t2a", "a2t"), text_groups=None, group_names=()) -> dict[str, float]:
    """Text→audio and audio→text retrieval metrics (design notes, section 5).

    T2A: every caption is a query with one relevant audio. A2T: every audio is a query with its
    captions relevant; R@k hits when any of them ranks ≤ k. Tied relevant captions are ordered by
    ``text_keys`` (their row order when not given). ``sort_ranks=False`` reproduces the LAION-CLAP
    mistake of pairing hit counts with captions in key order instead of rank order. With
    ``text_groups`` (one group index per caption, -1 for none) the T2A metrics of each named group
    follow under ``<t2a>/<group name>/``.
    """
    if text_keys is None:
        text_keys = torch.arange(len(text_ids))
    scores = (text_emb.double() @ audio_emb.double().T).tolist()  # [caption][audio]
    audio_ids_, text_ids_, text_keys_ = audio_ids.tolist(), text_ids.tolist(), text_keys.tolist()
    texts = range(len(text_ids_))

    t2a = t2a_ranks(audio_emb, audio_ids, text_emb, text_ids)
    out = {f"{names[0]}/{k}": v for k, v in summary(t2a, [1 / r if r <= 10 else 0.0 for r in t2a]).items()}
    if text_groups is not None:
        groups = text_groups.tolist()
        for index, name in enumerate(group_names):
            mine = [r for r, group in zip(t2a, groups) if group == index]
            if mine:
                values = summary(mine, [1 / r if r <= 10 else 0.0 for r in mine])
                out.update({f"{names[0]}/{name}/{k}": v for k, v in values.items()})

    best, aps = [], []
    for a in range(len(audio_ids_)):
        column = [scores[j][a] for j in texts]
        relevant = {j for j in texts if text_ids_[j] == audio_ids_[a]}
        order = ranked(texts, column, relevant, text_keys_)
        ranks = [order.index(j) + 1 for j in sorted(relevant, key=lambda j: text_keys_[j])]
        if sort_ranks:
            ranks = sorted(ranks)
        aps.append(sum((i + 1) / r for i, r in enumerate(ranks) if r <= 10) / len(ranks))
        best.append(min(ranks))
    out.update({f"{names[1]}/{k}": v for k, v in summary(best, aps).items()})
    return out


def score_matrix_reference(scores, relevant, prefix: str) -> dict[str, float]:
    """The same metrics from a ``(queries, candidates)`` score matrix and its boolean relevance:
    per query the ranks of its relevant candidates, ties pessimistic; R@k on the best rank; AP@10
    over the relevant candidates ranked ≤ 10, divided by their number."""
    values, labels = scores.double().tolist(), relevant.tolist()
    best, aps = [], []
    for row, marks in zip(values, labels):
        candidates = list(range(len(row)))
        mine = {j for j in candidates if marks[j]}
        order = ranked(candidates, row, mine, candidates)
        ranks = sorted(order.index(j) + 1 for j in mine)
        best.append(ranks[0])
        aps.append(average_precision_at_10(ranks))
    return {f"{prefix}/{k}": v for k, v in summary(best, aps).items()}


def text_text_reference(text_emb, text_ids, text_keys=None) -> dict[str, float]:
    """Caption→caption retrieval: each caption of a clip with two or more captions is a query, its
    sibling captions are relevant, and every other caption (not the query itself) is a candidate."""
    if text_keys is None:
        text_keys = torch.arange(len(text_ids))
    scores = (text_emb.double() @ text_emb.double().T).tolist()
    ids, keys = text_ids.tolist(), text_keys.tolist()
    best, aps = [], []
    for q in range(len(ids)):
        siblings = {j for j in range(len(ids)) if j != q and ids[j] == ids[q]}
        if not siblings:
            continue
        others = [j for j in range(len(ids)) if j != q]
        order = ranked(others, scores[q], siblings, keys)
        ranks = sorted(order.index(j) + 1 for j in siblings)
        aps.append(average_precision_at_10(ranks))
        best.append(ranks[0])
    return {f"t2t/{k}": v for k, v in summary(best, aps).items()}


def hard_negative_reference(query_emb, audio_emb, target, negative, ks=RECALL_AT) -> dict[str, float]:
    """HNSR@k (target ranked ≤ k and its hard negative not), R@k, Δ-rank = rank(negative) −
    rank(target) (mean, median) and the share of queries whose negative outranks the target; the
    target's ties count against it, the negative's for it."""
    scores = (query_emb.double() @ audio_emb.double().T).tolist()
    rank_t, rank_n = [], []
    for row, t, n in zip(scores, target.tolist(), negative.tolist()):
        rank_t.append(1 + sum(s >= row[t] for j, s in enumerate(row) if j != t))
        rank_n.append(1 + sum(s > row[n] for j, s in enumerate(row) if j != n))
    delta = [n - t for t, n in zip(rank_t, rank_n)]
    m = len(delta)
    out = {}
    for k in ks:
        out[f"hn/HNSR@{k}"] = 100 * sum(t <= k < n for t, n in zip(rank_t, rank_n)) / m
        out[f"hn/R@{k}"] = 100 * sum(t <= k for t in rank_t) / m
    out["hn/delta_rank_mean"] = sum(delta) / m
    out["hn/delta_rank_median"] = statistics.median(delta)
    out["hn/neg_above_target"] = 100 * sum(d < 0 for d in delta) / m
    return out


def qa_reference(query_emb, choice_emb, choice_item, answer_choice, categories, names) -> dict[str, float]:
    """QA by retrieval: a question is right when its answer scores strictly above each of its other
    choices; accuracy and chance (1 / number of choices) overall and per named category."""
    scores = (query_emb.double()[choice_item] * choice_emb.double()).sum(1).tolist()
    items, answers = choice_item.tolist(), answer_choice.tolist()
    correct, chance = [], []
    for q, a in enumerate(answers):
        mine = [c for c, item in enumerate(items) if item == q]
        correct.append(all(scores[a] > scores[c] for c in mine if c != a))
        chance.append(1 / len(mine))
    out = {"qa/accuracy": 100 * sum(correct) / len(correct), "chance/qa/accuracy": 100 * sum(chance) / len(chance)}
    for index, name in enumerate(names):
        members = [i for i, cat in enumerate(categories.tolist()) if cat == index]
        if members:
            out[f"qa/accuracy/{name}"] = 100 * sum(correct[i] for i in members) / len(members)
            out[f"chance/qa/accuracy/{name}"] = 100 * sum(chance[i] for i in members) / len(members)
    return out


def zero_shot_reference(audio_emb, class_emb, targets, multi_label, ks=(1, 5)) -> dict[str, float]:
    """CLAP's protocol (design notes, section 9): top-k accuracy for single-label sets, mAP over the
    classes with a positive (the AP of each class's clip ranking) for multi-label sets."""
    scores = (audio_emb.double() @ class_emb.double().T).tolist()
    labels = targets.tolist()
    clips, classes = range(len(scores)), range(len(scores[0]))
    if not multi_label:
        ranks = []
        for i in clips:
            (y,) = [c for c in classes if labels[i][c]]
            ranks.append(1 + sum(1 for c in classes if c != y and scores[i][c] >= scores[i][y]))
        return {f"zs/top{k}": 100 * sum(r <= k for r in ranks) / len(ranks) for k in ks}
    aps = []
    for c in classes:
        positives = {i for i in clips if labels[i][c]}
        if not positives:
            continue
        order = ranked(list(clips), [scores[i][c] for i in clips], positives, list(clips))
        ranks = sorted(order.index(i) + 1 for i in positives)
        aps.append(sum((t + 1) / r for t, r in enumerate(ranks)) / len(ranks))
    return {"zs/mAP": 100 * sum(aps) / len(aps)}


def diagnostics_reference(audio, audio_ids, text, text_ids) -> dict[str, float]:
    """Embedding diagnostics in numpy float64: modality gap (distance of the means), MMD² with a
    Gaussian kernel at the median pairwise distance (unbiased), alignment (mean squared distance of
    matching pairs) and the log-mean-exp uniformity of each side."""
    audio, text = audio.double().numpy(), text.double().numpy()
    row_of = {clip: i for i, clip in enumerate(audio_ids.tolist())}

    def pair_sq(x, y):
        return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)

    def upper(square):
        return square[np.triu_indices(square.shape[0], 1)]

    pooled = np.concatenate([audio, text])
    sigma = np.median(np.sqrt(upper(pair_sq(pooled, pooled))))
    m, n = len(audio), len(text)
    k = np.exp(-pair_sq(pooled, pooled) / (2 * sigma**2))
    kxx, kyy, kxy = k[:m, :m], k[m:, m:], k[:m, m:]
    mmd = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    pairs = [((audio[row_of[c]] - t) ** 2).sum() for c, t in zip(text_ids.tolist(), text)]
    return {
        "diag/modality_gap": np.linalg.norm(audio.mean(0) - text.mean(0)),
        "diag/mmd": mmd,
        "diag/alignment": np.mean(pairs),
        "diag/uniformity_audio": np.log(np.mean(np.exp(-2 * upper(pair_sq(audio, audio))))),
        "diag/uniformity_text": np.log(np.mean(np.exp(-2 * upper(pair_sq(text, text))))),
    }


def topk_reference(queries, corpus, k) -> tuple[list[list[float]], list[list[int]]]:
    """The k best corpus rows of every query by float64 dot product, ties broken by corpus index,
    as (scores, indices) lists."""
    scores, indices = [], []
    corpus_rows = corpus.double().tolist()
    for query in queries.double().tolist():
        row = [sum(q * c for q, c in zip(query, candidate)) for candidate in corpus_rows]
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        scores.append([row[j] for j in order])
        indices.append(order)
    return scores, indices
