"""InfoNCE, the maskers, Matryoshka and the shared validation, against float64 references.

The references below are written independently of the library: plain loops over anchors and
candidates, exp and log of scalars, in float64. Gradients come from autograd on the reference.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from losses import (
    DuplicateMasker,
    GuideModelMasker,
    HybridNCE,
    InfoNCE,
    MarginMasker,
    Matryoshka,
    Temperature,
)
from losses.structure import BatchInfo, Direction, Structure

B, D = 7, 5
CLIP_IDS = [0, 1, 0, 2, 3, 1, 4]
TEXTS = ["a dog", "rain", "a cat", "a dog", "wind", "birds", "engine"]


def embeddings(seed=0, dtype=torch.float64, n=B, dim=D):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    # Documents correlated with their queries, so that positives and margins are meaningful.
    d = F.normalize(q + 0.7 * torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    return q.to(dtype).requires_grad_(), d.to(dtype).requires_grad_()


def random_mask(seed=1, n=B):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, n, generator=g) < 0.15


# ---------- independent references ----------


def ref_positives(n, clip_ids=None, texts=None, positive_mask=None):
    """P[i][j]: document j is an extra positive of query i."""
    return [
        [
            i != j
            and (
                (clip_ids is not None and clip_ids[i] == clip_ids[j])
                or (texts is not None and texts[i] == texts[j])
                or (positive_mask is not None and bool(positive_mask[i][j]))
            )
            for j in range(n)
        ]
        for i in range(n)
    ]


def no_pairs(n):
    return [[False] * n for _ in range(n)]


def ref_margin_drops(S, margin, P):
    """drop[direction][anchor][candidate] under the margin rule, never a target or positive."""
    n = len(S)
    q2d = [[j != i and not P[i][j] and S[i][j] > S[i][i] + margin for j in range(n)] for i in range(n)]
    d2q = [[i != j and not P[i][j] and S[i][j] > S[j][j] + margin for i in range(n)] for j in range(n)]
    return {"q2d": q2d, "d2q": d2q}


def ref_guide_drops(G, margin, P):
    n = len(G)
    q2d = [[j != i and not P[i][j] and G[i][j] > G[i][i] - margin for j in range(n)] for i in range(n)]
    d2q = [[i != j and not P[i][j] and G[i][j] > G[j][j] - margin for i in range(n)] for j in range(n)]
    return {"q2d": q2d, "d2q": d2q}


def ref_directions(S, P, drops):
    """Per direction: (anchor logits accessor, positives of anchor a, drops of anchor a)."""
    n = S.shape[0]
    drops = drops or {"q2d": no_pairs(n), "d2q": no_pairs(n)}
    return {
        "q2d": (lambda a, c: S[a, c], lambda a, c: P[a][c], lambda a, c: drops["q2d"][a][c]),
        "d2q": (lambda a, c: S[c, a], lambda a, c: P[c][a], lambda a, c: drops["d2q"][a][c]),
    }


def ref_infonce(q, d, scale, mode="none", P=None, drops=None, directions="both"):
    S = q @ d.T
    n = S.shape[0]
    P = P if P is not None else no_pairs(n)
    out = {}
    for name, (s, pos, drop) in ref_directions(S, P, drops).items():
        total = 0.0
        for a in range(n):
            den = sum(
                torch.exp(scale * s(a, c))
                for c in range(n)
                if not drop(a, c) and not (mode == "mask" and pos(a, c))
            )
            if mode == "multi":
                num = sum(torch.exp(scale * s(a, c)) for c in range(n) if c == a or pos(a, c))
            else:
                num = torch.exp(scale * s(a, a))
            total = total - torch.log(num / den)
        out[name] = total / n
    return combine(out, directions)


def combine(per_direction, directions):
    if directions == "both":
        return (per_direction["q2d"] + per_direction["d2q"]) / 2
    return per_direction[directions]


def stored_scale(loss):
    """1/τ as the module stores it (log 1/τ in float32), so references use the same τ."""
    return loss.temperature.log_scale.detach().double().exp()


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


# ---------- InfoNCE ----------


@pytest.mark.parametrize("directions", ["q2d", "d2q", "both"])
@pytest.mark.parametrize("mode", ["none", "multi", "mask"])
def test_infonce_matches_reference(mode, directions):
    q, d = embeddings()
    mask = random_mask()
    loss = InfoNCE(temperature=0.07, positives=mode, directions=directions)
    out = loss(q, d, BatchInfo(clip_index=torch.tensor(CLIP_IDS), texts=TEXTS, positive_mask=mask))
    P = ref_positives(B, CLIP_IDS, TEXTS, mask.tolist())
    assert any(any(row) for row in P)
    ref = ref_infonce(q, d, stored_scale(loss), mode, P if mode != "none" else None, directions=directions)
    torch.testing.assert_close(out.loss, ref, rtol=0, atol=1e-10)
    for got, want in zip(grads(out.loss, q, d), grads(ref, q, d)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_infonce_float32_inputs_match_float64_reference():
    q, d = embeddings()
    q32, d32 = q.detach().float().requires_grad_(), d.detach().float().requires_grad_()
    loss = InfoNCE(temperature=0.05, positives="multi")
    out = loss(q32, d32, BatchInfo(clip_index=torch.tensor(CLIP_IDS)))
    assert out.loss.dtype == torch.float32
    ref = ref_infonce(q, d, stored_scale(loss), "multi", ref_positives(B, CLIP_IDS))
    torch.testing.assert_close(out.loss.double(), ref, rtol=0, atol=1e-5)
    for got, want in zip(grads(out.loss, q32, d32), grads(ref, q, d)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_half_precision_embeddings_compute_in_float32():
    q, d = embeddings()
    qb, db = q.detach().bfloat16().requires_grad_(), d.detach().bfloat16().requires_grad_()
    out = InfoNCE()(qb, db)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert qb.grad.dtype == torch.bfloat16 and torch.isfinite(qb.grad.float()).all()


def test_learnable_temperature_gradient_matches_reference():
    q, d = embeddings()
    loss = InfoNCE(temperature=0.1, learnable_temperature=True, positives="mask")
    out = loss(q, d, BatchInfo(clip_index=torch.tensor(CLIP_IDS)))
    log_scale = loss.temperature.log_scale.detach().double().requires_grad_()
    ref = ref_infonce(q, d, log_scale.exp(), "mask", ref_positives(B, CLIP_IDS))
    torch.testing.assert_close(out.loss, ref, rtol=0, atol=1e-10)
    (got,) = grads(out.loss, loss.temperature.log_scale)
    (want,) = grads(ref, log_scale)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


def test_temperature_clamps_stored_value_and_keeps_gradient():
    temperature = Temperature(0.05, learnable=True, max_logit_scale=100.0)
    with torch.no_grad():
        temperature.log_scale.fill_(math.log(500.0))
    scale = temperature.scale()
    torch.testing.assert_close(scale, torch.tensor(100.0))
    scale.backward()
    assert temperature.log_scale.grad.item() == pytest.approx(100.0)
    with pytest.raises(ValueError, match="max_logit_scale"):
        Temperature(0.001, max_logit_scale=100.0)


def test_logs():
    q, d = embeddings()
    out = InfoNCE(positives="multi", masker=MarginMasker(0.0))(q, d, BatchInfo(clip_index=torch.tensor(CLIP_IDS)))
    expected = {"loss_q2d", "loss_d2q", "temperature", "sim_pos", "sim_neg", "sim_neg_max", "masked_fraction"}
    assert expected | {"extra_positives"} == set(out.logs)
    assert all(not v.requires_grad and v.ndim == 0 for v in out.logs.values())
    S = (q @ d.T).detach()
    torch.testing.assert_close(out.logs["sim_pos"], S.diag().mean())
    torch.testing.assert_close(out.logs["temperature"], torch.tensor(0.05))
    torch.testing.assert_close(out.loss.detach(), (out.logs["loss_q2d"] + out.logs["loss_d2q"]) / 2)
    # Clip 0 appears twice and clip 1 twice: 4 extra positives over 7 anchors.
    torch.testing.assert_close(out.logs["extra_positives"], torch.tensor(4 / 7))

    plain = InfoNCE()(q, d).logs
    off = ~torch.eye(B, dtype=torch.bool)
    torch.testing.assert_close(plain["sim_neg"], S[off].mean())
    hardest_row = S.masked_fill(~off, -2).amax(1).mean()
    hardest_column = S.masked_fill(~off, -2).amax(0).mean()
    torch.testing.assert_close(plain["sim_neg_max"], (hardest_row + hardest_column) / 2)


# ---------- maskers ----------

HAND_S = torch.tensor([[0.5, 0.65, 0.55], [0.2, 0.3, 0.45], [0.9, 0.1, 0.7]], dtype=torch.float64)


def hand_direction(name, S):
    scores = S if name == "q2d" else S.T
    return Direction(name, scores, scores / 0.05, torch.arange(S.shape[0]))


def pairs(mask):
    return {tuple(ix) for ix in mask.nonzero().tolist()}


def test_margin_masker_on_hand_built_matrix():
    masker = MarginMasker(margin=0.1)
    # Rows: 0.65 > 0.5 + 0.1, 0.45 > 0.3 + 0.1, 0.9 > 0.7 + 0.1; 0.55 and 0.2 are not.
    assert pairs(masker(hand_direction("q2d", HAND_S), Structure(3))) == {(0, 1), (1, 2), (2, 0)}
    # Columns (anchor document, candidate query): 0.9 > 0.5 + 0.1 and 0.65 > 0.3 + 0.1.
    assert pairs(masker(hand_direction("d2q", HAND_S), Structure(3))) == {(0, 2), (1, 0)}


def test_guide_masker_on_hand_built_matrix():
    guide = torch.tensor([[0.8, 0.75, 0.1], [0.2, 0.4, 0.35], [0.65, 0.0, 0.6]])
    masker = GuideModelMasker(margin=0.1)
    structure = Structure(3, guide_scores=guide)
    # Rows: 0.75 > 0.8 - 0.1, 0.35 > 0.4 - 0.1, 0.65 > 0.6 - 0.1.
    assert pairs(masker(hand_direction("q2d", HAND_S), structure)) == {(0, 1), (1, 2), (2, 0)}
    # Columns: column 0 (0.8): 0.65 no; column 1 (0.4): 0.75 yes; column 2 (0.6): 0.35 no.
    assert pairs(masker(hand_direction("d2q", HAND_S), structure)) == {(1, 0)}


def test_duplicate_masker_uses_clip_ids_and_texts():
    clip_ids, texts = torch.tensor([0, 1, 0, 2]), ["x", "y", "z", "y"]
    structure = Structure.encode(4, torch.device("cpu"), BatchInfo(clip_index=clip_ids, texts=texts))
    drop = DuplicateMasker()(hand_direction("q2d", torch.zeros(4, 4)), structure)
    assert pairs(drop) == {(0, 2), (2, 0), (1, 3), (3, 1)}


@pytest.mark.parametrize("directions", ["q2d", "d2q", "both"])
def test_maskers_compose_and_match_reference(directions):
    q, d = embeddings(seed=3)
    noise = torch.randn(B, B, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    guide = (q @ d.T).detach() + 0.05 * noise
    loss = InfoNCE(directions=directions, masker=[MarginMasker(0.05), GuideModelMasker(0.05)])
    out = loss(q, d, BatchInfo(guide_scores=guide))
    S = (q @ d.T).detach().tolist()
    margin = ref_margin_drops(S, 0.05, no_pairs(B))
    guided = ref_guide_drops(guide.tolist(), 0.05, no_pairs(B))
    drops = {k: [[a or b for a, b in zip(r1, r2)] for r1, r2 in zip(margin[k], guided[k])] for k in margin}
    ref = ref_infonce(q, d, stored_scale(loss), drops=drops, directions=directions)
    torch.testing.assert_close(out.loss, ref, rtol=0, atol=1e-10)
    for got, want in zip(grads(out.loss, q, d), grads(ref, q, d)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    used = ["q2d", "d2q"] if directions == "both" else [directions]
    fraction = sum(sum(map(sum, drops[k])) for k in used) / (len(used) * B * (B - 1))
    assert 0 < fraction < 1
    assert out.logs["masked_fraction"].item() == pytest.approx(fraction)


def test_maskers_never_drop_targets_or_extra_positives():
    q, d = embeddings()
    # A margin of -2 marks every candidate: only targets and positives must survive.
    loss = InfoNCE(positives="multi", masker=MarginMasker(-2.0))
    out = loss(q, d, BatchInfo(clip_index=torch.tensor(CLIP_IDS)))
    P = ref_positives(B, CLIP_IDS)
    drops = {
        "q2d": [[c != a and not P[a][c] for c in range(B)] for a in range(B)],
        "d2q": [[c != a and not P[c][a] for c in range(B)] for a in range(B)],
    }
    ref = ref_infonce(q, d, stored_scale(loss), "multi", P, drops)
    torch.testing.assert_close(out.loss, ref, rtol=0, atol=1e-10)
    assert out.logs["masked_fraction"].item() == pytest.approx(1 - 4 / (B * (B - 1)))


def test_duplicate_masker_equals_mask_mode():
    q, d = embeddings()
    info = BatchInfo(clip_index=torch.tensor(CLIP_IDS), texts=TEXTS)
    masked = InfoNCE(masker=DuplicateMasker())(q, d, info).loss
    torch.testing.assert_close(masked, InfoNCE(positives="mask")(q, d, info).loss, rtol=0, atol=1e-12)


# ---------- Matryoshka ----------


def test_matryoshka_is_weighted_sum_over_truncated_renormalised_embeddings():
    q, d = embeddings(dim=8)
    inner = InfoNCE(temperature=0.07, positives="multi")
    dims, weights = [8, 4, 2], [1.0, 0.5, 0.25]
    out = Matryoshka(inner, dims, weights)(q, d, BatchInfo(clip_index=torch.tensor(CLIP_IDS)))
    P = ref_positives(B, CLIP_IDS)
    ref = sum(
        w * ref_infonce(F.normalize(q[:, :k], dim=-1), F.normalize(d[:, :k], dim=-1), stored_scale(inner), "multi", P)
        for k, w in zip(dims, weights)
    )
    torch.testing.assert_close(out.loss, ref, rtol=0, atol=1e-10)
    for got, want in zip(grads(out.loss, q, d), grads(ref, q, d)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert {"loss_dim8", "loss_dim4", "loss_dim2", "temperature"} <= set(out.logs)
    with pytest.raises(ValueError, match="dims"):
        Matryoshka(inner, [16])(q, d)
    with pytest.raises(ValueError, match="weights"):
        Matryoshka(inner, [8, 4], [1.0])


# ---------- validation ----------


def _bad_calls():
    q, d = embeddings()
    q, d = q.detach(), d.detach()
    nan = q.clone()
    nan[0, 0] = float("nan")
    return [
        ((nan, d), {}, "query"),
        ((q, nan), {}, "document"),
        ((q, d[:3]), {}, "shape"),
        ((q, d.float()), {}, "dtype"),
        ((q[0], d[0]), {}, "query"),
        ((q.long(), d.long()), {}, "floating"),
        ((q, d), {"positive_mask": torch.ones(B, B)}, "positive_mask"),
        ((q, d), {"positive_mask": torch.ones(B, B - 1, dtype=torch.bool)}, "positive_mask"),
        ((q, d), {"clip_index": torch.zeros(B)}, "clip_index"),
        ((q, d), {"clip_index": torch.zeros(B + 1, dtype=torch.long)}, "clip_index"),
        ((q, d), {"texts": ["a"] * (B - 1)}, "texts"),
        ((q, d), {"texts": [1] * B}, r"texts\[0\]"),
        ((q, d), {"tag_clusters": [[1]] * B}, r"tag_clusters\[0\]"),
        ((q, d), {"caption_kinds": "tags"}, "caption_kinds"),
        ((q, d), {"guide_scores": torch.zeros(B, B - 1)}, "guide_scores"),
        ((q, d), {"guide_scores": torch.full((B, B), float("nan"))}, "guide_scores"),
        ((q, d), {"clip_id": torch.zeros(B, dtype=torch.long)}, "clip_id"),
    ]


@pytest.mark.parametrize("args, kwargs, message", _bad_calls())
def test_bad_inputs_name_the_argument(args, kwargs, message):
    for loss in (InfoNCE(), HybridNCE(), Matryoshka(InfoNCE(), [2])):
        with pytest.raises((ValueError, TypeError), match=message):
            loss(*args, BatchInfo(**kwargs))


@pytest.mark.parametrize(
    "loss, kwargs, message",
    [
        (InfoNCE(masker=DuplicateMasker()), {}, "clip_index"),
        (InfoNCE(masker=GuideModelMasker()), {"clip_index": torch.arange(B)}, "guide_scores"),
        (InfoNCE(positives="multi"), {}, "clip_index"),
        (HybridNCE(), {"tag_clusters": [frozenset()] * B}, "caption_kinds"),
    ],
)
def test_missing_structure_is_named(loss, kwargs, message):
    q, d = embeddings()
    with pytest.raises(ValueError, match=message):
        loss(q, d, BatchInfo(**kwargs))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"positives": "all"}, "positives"), ({"directions": "a2t"}, "directions"), ({"gather": "all"}, "gather")],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InfoNCE(**kwargs)
