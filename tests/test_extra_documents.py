"""Losses with more documents than queries: documents beyond the pairs are extra negatives (e.g. the
hard negatives of text pairs), candidates of every query in the query→document direction only.

References are written out in float64 from the definitions: InfoNCE with hard negatives is the
cross-entropy of each query over all B + M documents with its own pair as the target (the
in-batch-plus-hard-negatives loss of SimCSE and sentence-transformers'
MultipleNegativesRankingLoss); the document→query direction sees the B queries only.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from losses import BatchInfo, DuplicateMasker, GuideModelMasker, HybridNCE, InfoNCE

B, M, D = 5, 3, 7


def tau(loss):
    """The loss's τ as stored (its log 1/τ is a float32 value), in float64."""
    return 1.0 / loss.temperature.scale(torch.float64).item()


def batch(seed=0, extra=M):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    d = F.normalize(torch.randn(B + extra, D, generator=g, dtype=torch.float64), dim=-1)
    return q, d


def ref_q2d(q, d, tau, drop=None):
    """Mean over queries of -log softmax_j(q_i·d_j / τ)[i] over every document j not dropped."""
    total = 0.0
    for i in range(q.shape[0]):
        logits = [float(q[i] @ d[j]) / tau for j in range(d.shape[0]) if drop is None or not drop(i, j)]
        target = float(q[i] @ d[i]) / tau
        total += math.log(sum(math.exp(x) for x in logits)) - target
    return total / q.shape[0]


def ref_d2q(q, d, tau):
    """Mean over the pair documents of -log softmax_i(d_j·q_i / τ)[j] over the B queries."""
    total = 0.0
    for j in range(q.shape[0]):
        logits = [float(d[j] @ q[i]) / tau for i in range(q.shape[0])]
        total += math.log(sum(math.exp(x) for x in logits)) - float(d[j] @ q[j]) / tau
    return total / q.shape[0]


def test_infonce_q2d_softmax_runs_over_every_document():
    q, d = batch()
    loss = InfoNCE(temperature=0.05, directions="q2d")
    assert loss(q, d).loss.item() == pytest.approx(ref_q2d(q, d, tau(loss)), abs=1e-10)


def test_infonce_both_directions_extras_only_in_q2d():
    q, d = batch(1)
    loss = InfoNCE(temperature=0.1)
    out = loss(q, d)
    expected = (ref_q2d(q, d, tau(loss)) + ref_d2q(q, d, tau(loss))) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-10)
    assert out.logs["loss_d2q"].item() == pytest.approx(ref_d2q(q, d, tau(loss)), abs=1e-10)


def test_extra_documents_change_the_loss_only_through_q2d():
    q, d = batch(2)
    with_extras = InfoNCE(temperature=0.1, directions="d2q")(q, d).loss
    without = InfoNCE(temperature=0.1, directions="d2q")(q, d[:B]).loss
    assert with_extras.item() == pytest.approx(without.item(), abs=1e-12)
    q2d = InfoNCE(temperature=0.1, directions="q2d")
    assert q2d(q, d).loss.item() > q2d(q, d[:B]).loss.item()  # more negatives, larger denominator


def test_gradient_reaches_the_extra_documents():
    q, d = batch(3)
    d.requires_grad_()
    InfoNCE(temperature=0.05, directions="q2d")(q, d).loss.backward()
    assert d.grad[B:].abs().sum() > 0


def test_duplicate_masker_drops_an_extra_with_the_anchors_text():
    q, d = batch(4)
    texts = [f"text {i}" for i in range(B)]
    extra_texts = ["other", texts[2], "another"]  # extra 1 repeats pair 2's document
    info = BatchInfo(clip_index=torch.arange(B), texts=texts, extra_texts=extra_texts)
    loss = InfoNCE(temperature=0.1, directions="q2d", masker=DuplicateMasker())
    out = loss(q, d, info)
    expected = ref_q2d(q, d, tau(loss), drop=lambda i, j: i == 2 and j == B + 1)
    assert out.loss.item() == pytest.approx(expected, abs=1e-10)


def test_extras_never_share_a_clip_with_a_pair():
    q, d = batch(5)
    info = BatchInfo(clip_index=torch.tensor([0, 1, 2, 3, 4]))
    loss = InfoNCE(temperature=0.1, directions="q2d", masker=DuplicateMasker())
    masked = loss(q, d, info)
    assert masked.loss.item() == pytest.approx(ref_q2d(q, d, tau(loss)), abs=1e-10)
    assert masked.logs["masked_fraction"].item() == 0.0


def test_guide_scores_given_for_the_pairs_leave_the_extras_in():
    q, d = batch(6)
    guide = torch.full((B, B), -1.0, dtype=torch.float64)
    guide.fill_diagonal_(1.0)
    loss = InfoNCE(temperature=0.1, directions="q2d", masker=GuideModelMasker(0.0))
    out = loss(q, d, BatchInfo(guide_scores=guide))
    assert out.loss.item() == pytest.approx(ref_q2d(q, d, tau(loss)), abs=1e-10)
    wide = torch.cat([guide, torch.full((B, M), 2.0, dtype=torch.float64)], 1)  # the guide flags every extra
    out = loss(q, d, BatchInfo(guide_scores=wide))
    assert out.loss.item() == pytest.approx(ref_q2d(q, d[:B], tau(loss)), abs=1e-10)


def test_hybrid_without_structure_reduces_to_infonce_with_extras():
    q, d = batch(7)
    loss = HybridNCE(temperature=0.1, alpha=1.0, beta=0.0, lam=0.0, directions="q2d")
    assert loss(q, d).loss.item() == pytest.approx(ref_q2d(q, d, tau(loss)), abs=1e-10)


def test_hybrid_tags_never_make_an_extra_positive():
    q, d = batch(8)
    tags = [frozenset({1})] * B
    info = BatchInfo(tag_clusters=tags, caption_kinds=["tags"] * B)
    out = HybridNCE(temperature=0.1, lam=0.5, positives_only_for_tags=True, directions="q2d")(q, d, info)
    # every pair shares the tag cluster: every other pair document is an extra positive, no extra is
    assert out.logs["extra_positives"].item() == pytest.approx(B - 1)


@pytest.mark.parametrize(
    "document, info, message",
    [
        (torch.zeros(B - 1, D, dtype=torch.float64), None, "at least one row per query"),
        (torch.zeros(B + M, D + 1, dtype=torch.float64), None, "do not match"),
        (None, BatchInfo(extra_texts=["a"]), "extra_texts must be a list of 3"),
        (None, BatchInfo(positive_mask=torch.zeros(B, B + 1, dtype=torch.bool)), "positive_mask must be"),
    ],
)
def test_bad_extra_documents(document, info, message):
    q, d = batch(9)
    document = d if document is None else document
    with pytest.raises(ValueError, match=message):
        InfoNCE()(q, document, info)
