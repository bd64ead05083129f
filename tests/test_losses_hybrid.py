"""HybridNCE against a float64 loop reference of the AuroLA formula, and TagClusterMap."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from losses import HybridNCE, InfoNCE, MarginMasker, TagClusterMap
from losses.structure import BatchInfo, Structure

B, D = 8, 5
TAGS = [{1, 2}, {3}, {1, 2}, set(), {1, 2}, {3}, {4}, {3}]
KINDS = ["tags", "tags", "long", "tags", "tags", "short", "tags", "tags"]
CLIP_IDS = [0, 1, 2, 3, 4, 5, 6, 3]


def embeddings(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    d = F.normalize(q + 0.7 * torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    return q.requires_grad_(), d.requires_grad_()


def structure(**overrides):
    kwargs = dict(tag_clusters=[frozenset(t) for t in TAGS], caption_kinds=KINDS, clip_index=torch.tensor(CLIP_IDS))
    kwargs.update(overrides)
    return BatchInfo(**kwargs)


def ref_positives(only_for_tags=True, tags=TAGS, kinds=KINDS, clip_ids=CLIP_IDS):
    def active(i):
        return bool(tags[i]) and (not only_for_tags or kinds[i] == "tags")

    return [
        [
            i != j
            and (
                (active(i) and active(j) and tags[i] == tags[j])
                or (clip_ids is not None and clip_ids[i] == clip_ids[j])
            )
            for j in range(B)
        ]
        for i in range(B)
    ]


def ref_hybrid(q, d, scale, alpha, beta, lam, P, directions="both", drops=None, detach=False, t2a_rows=False):
    """Loop reference of DESIGN §4. ``t2a_rows`` reproduces AuroLA's t→a branch (row sums reused)."""
    S = q @ d.T
    W = S.detach() if detach else S
    n = S.shape[0]
    drops = drops or {k: [[False] * n for _ in range(n)] for k in ("q2d", "d2q")}
    access = {
        "q2d": (lambda a, c: S[a, c], lambda a, c: W[a, c], lambda a, c: P[a][c]),
        "d2q": (lambda a, c: S[c, a], lambda a, c: W[c, a], lambda a, c: P[c][a]),
    }
    def positive_sum(s, pos, a):
        return torch.exp(scale * s(a, a)) + sum(lam * torch.exp(scale * s(a, c)) for c in range(n) if pos(a, c))

    losses = {}
    for name, (s, w, pos) in access.items():
        total = 0.0
        for a in range(n):
            if t2a_rows and name == "d2q":
                pos_sum = positive_sum(access["q2d"][0], access["q2d"][2], a)
            else:
                pos_sum = positive_sum(s, pos, a)
            negatives = [c for c in range(n) if c != a and not pos(a, c) and not drops[name][a][c]]
            neg_sum = 0.0
            if negatives:
                z = sum(torch.exp(beta * scale * w(a, k)) for k in negatives)
                for c in negatives:
                    weight = len(negatives) * torch.exp(beta * scale * w(a, c)) / z
                    neg_sum = neg_sum + weight * torch.exp(scale * s(a, c))
            elif alpha == 0:
                continue
            total = total - torch.log(pos_sum / (alpha * pos_sum + neg_sum))
        losses[name] = total / n
    if directions == "both":
        return (losses["q2d"] + losses["d2q"]) / 2
    return losses[directions]


def stored_scale(loss):
    return loss.temperature.log_scale.detach().double().exp()


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def assert_matches(out, ref, q, d, atol=1e-10):
    torch.testing.assert_close(out.loss, ref, rtol=0, atol=atol)
    for got, want in zip(grads(out.loss, q, d), grads(ref, q, d)):
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


@pytest.mark.parametrize(
    "alpha, beta, lam, detach, directions, only_for_tags",
    [
        (1.0, 0.1, 1.0, False, "both", True),
        (0.5, 0.5, 0.3, False, "both", True),
        (0.5, 0.5, 0.3, True, "both", True),
        (0.3, 1.0, 0.0, False, "q2d", False),
        (0.0, 0.2, 0.7, False, "d2q", True),
        (0.0, 0.0, 1.0, True, "both", False),
        (2.0, 0.3, 0.5, False, "d2q", False),
    ],
)
def test_hybrid_matches_reference(alpha, beta, lam, detach, directions, only_for_tags):
    q, d = embeddings()
    loss = HybridNCE(
        temperature=0.1,
        alpha=alpha,
        beta=beta,
        lam=lam,
        detach_weights=detach,
        directions=directions,
        positives_only_for_tags=only_for_tags,
    )
    out = loss(q, d, structure())
    P = ref_positives(only_for_tags)
    ref = ref_hybrid(q, d, stored_scale(loss), alpha, beta, lam, P, directions, detach=detach)
    assert_matches(out, ref, q, d)


def test_hybrid_with_margin_masker_matches_reference():
    q, d = embeddings(seed=2)
    loss = HybridNCE(alpha=0.5, beta=0.3, lam=0.5, masker=MarginMasker(0.02))
    out = loss(q, d, structure())
    P = ref_positives()
    S = (q @ d.T).detach()
    drops = {
        "q2d": [[j != i and not P[i][j] and S[i, j] > S[i, i] + 0.02 for j in range(B)] for i in range(B)],
        "d2q": [[i != j and not P[i][j] and S[i, j] > S[j, j] + 0.02 for i in range(B)] for j in range(B)],
    }
    assert out.logs["masked_fraction"] > 0
    assert_matches(out, ref_hybrid(q, d, stored_scale(loss), 0.5, 0.3, 0.5, P, drops=drops), q, d)


def test_hybrid_float32_matches_float64_reference():
    q, d = embeddings()
    q32, d32 = q.detach().float().requires_grad_(), d.detach().float().requires_grad_()
    loss = HybridNCE(temperature=0.05, alpha=0.5, beta=0.5, lam=0.5)
    out = loss(q32, d32, structure())
    ref = ref_hybrid(q, d, stored_scale(loss), 0.5, 0.5, 0.5, ref_positives())
    torch.testing.assert_close(out.loss.double(), ref, rtol=0, atol=1e-5)
    for got, want in zip(grads(out.loss, q32, d32), grads(ref, q, d)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_reduces_to_infonce():
    q, d = embeddings()
    plain = HybridNCE(alpha=1.0, beta=0.0, lam=0.0)(q, d).loss
    torch.testing.assert_close(plain, InfoNCE()(q, d).loss, rtol=0, atol=1e-12)
    # With tag positives, λ = 0 removes them from the denominator and λ = 1 adds them to the numerator.
    tag_mask = torch.tensor(ref_positives(clip_ids=None))
    assert tag_mask.any()
    for lam, mode in ((0.0, "mask"), (1.0, "multi")):
        hybrid = HybridNCE(alpha=1.0, beta=0.0, lam=lam)(q, d, structure(clip_index=None)).loss
        infonce = InfoNCE(positives=mode)(q, d, BatchInfo(positive_mask=tag_mask)).loss
        torch.testing.assert_close(hybrid, infonce, rtol=0, atol=1e-12)


def test_d2q_normalises_over_columns():
    q, d = embeddings(seed=4)
    info = structure()
    loss = HybridNCE(alpha=0.5, beta=0.3, lam=0.5, directions="d2q")
    out = loss(q, d, info).loss
    # Document→query on (q, d) is query→document on (d, q): the columns become rows.
    swapped = HybridNCE(alpha=0.5, beta=0.3, lam=0.5, directions="q2d")(d, q, info).loss
    torch.testing.assert_close(out, swapped, rtol=0, atol=1e-12)
    aurola = ref_hybrid(q, d, stored_scale(loss), 0.5, 0.3, 0.5, ref_positives(), "d2q", t2a_rows=True)
    assert abs(out.item() - aurola.item()) > 1e-3


def test_tag_positives_only_for_tag_captions():
    encoded = Structure.encode(B, torch.device("cpu"), structure(clip_index=None))
    for only in (True, False):
        got = HybridNCE(positives_only_for_tags=only).extra_positives(encoded)
        got &= ~torch.eye(B, dtype=torch.bool)
        assert got.tolist() == ref_positives(only, clip_ids=None)
    # Rows 0 and 2 share {1, 2}, but row 2 sampled a long caption.
    assert not HybridNCE().extra_positives(encoded)[0, 2]
    assert HybridNCE(positives_only_for_tags=False).extra_positives(encoded)[0, 2]


def test_rows_without_negatives():
    q, d = embeddings()
    same = BatchInfo(clip_index=torch.zeros(B, dtype=torch.long))
    for alpha in (0.0, 0.5):
        loss = HybridNCE(alpha=alpha, beta=0.5)
        out = loss(q, d, same)
        expected = 0.0 if alpha == 0 else math.log(alpha)
        assert out.loss.item() == pytest.approx(expected)
        assert all(torch.isfinite(g).all() for g in grads(out.loss, q, d))


def test_detached_weights_change_gradient_not_value():
    q, d = embeddings()
    a = HybridNCE(beta=0.5, alpha=0.5)(q, d)
    b = HybridNCE(beta=0.5, alpha=0.5, detach_weights=True)(q, d)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-12)
    assert not torch.allclose(grads(a.loss, q)[0], grads(b.loss, q)[0])


def test_bad_hybrid_settings():
    with pytest.raises(ValueError, match="beta"):
        HybridNCE(beta=-1.0)


# ---------- TagClusterMap ----------


def test_tag_cluster_map_from_file(tmp_path):
    path = tmp_path / "clusters.json"
    clusters = {"dog": {"cluster_index": 3}, "barking": {"cluster_index": 3}, "noise": {"cluster_index": None}}
    path.write_text(json.dumps(clusters))
    tags = TagClusterMap.from_file(path)
    assert tags.clusters_for(["dog"]) == frozenset({3})
    assert tags.clusters_for([" barking ", "noise"]) == frozenset({3})
    assert tags.clusters_for(["noise", ""]) == frozenset()
    # An unmapped tag is its own cluster: stable, negative, and distinct per tag.
    purr = tags.clusters_for(["purring"])
    assert purr == TagClusterMap({}).clusters_for(["purring"])
    assert len(purr) == 1 and next(iter(purr)) < 0
    assert purr != tags.clusters_for(["hissing"])
    assert tags.clusters_for(["dog", "purring"]) == frozenset({3}) | purr


@pytest.mark.parametrize("content", ['["dog"]', '{"dog": 3}', '{"dog": {"cluster_index": "3"}}'])
def test_tag_cluster_map_rejects_bad_files(tmp_path, content):
    path = tmp_path / "clusters.json"
    path.write_text(content)
    with pytest.raises(ValueError):
        TagClusterMap.from_file(path)
