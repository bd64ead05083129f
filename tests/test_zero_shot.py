"""Zero-shot classification and chance levels against brute force: float64 loops with exact ties
for the metrics; every equally likely placement of the relevant items for the chance formulas;
and a simulation of random rankings through the Metric classes, which checks that each set's
chance level is computed with the right numbers of candidates and relevant items."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch
from references import zero_shot_reference as reference_zero_shot
from test_metrics import integer_rows, make_dataset

from lightning_modules import chance
from lightning_modules.metrics import (
    AudioTextRetrieval,
    ZeroShotClassification,
    retrieval_metrics,
    text_text_metrics,
    zero_shot_metrics,
)

# ---------------------------------------------------------------------------------------------
# Zero-shot metrics
# ---------------------------------------------------------------------------------------------


def classification_data(seed, num_clips=40, num_classes=7, multi_label=False, dim=3):
    """Integer embeddings (exact dot products, so ties are real in float32 and float64 alike)."""
    g = torch.Generator().manual_seed(seed)
    audio = integer_rows(num_clips, dim, g)
    classes = integer_rows(num_classes, dim, g)
    if multi_label:
        targets = torch.rand(num_clips, num_classes, generator=g) < 0.3
        targets[:, -1] = False  # a class without positives is left out of the mean
    else:
        targets = torch.zeros(num_clips, num_classes, dtype=torch.bool)
        targets[torch.arange(num_clips), torch.randint(0, num_classes, (num_clips,), generator=g)] = True
    return audio, classes, targets


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("multi_label", [False, True])
def test_zero_shot_matches_reference_with_ties(seed, multi_label):
    audio, classes, targets = classification_data(900 + seed, multi_label=multi_label)
    result = zero_shot_metrics(audio, classes, targets, multi_label)
    expected = reference_zero_shot(audio, classes, targets, multi_label)
    assert sorted(result) == sorted(expected)
    for key, value in expected.items():
        assert result[key].dtype == torch.float32 and result[key].item() == pytest.approx(value, abs=1e-4), key


def test_zero_shot_tie_policy_by_hand():
    classes = torch.eye(3)
    # Clip 0 scores (0.5, 0.5, 0.25) and is class 0: tied with class 1, so rank 2 (missed at top-1).
    # Clip 1 scores (0, 0, 1) and is class 2: rank 1.
    audio = torch.tensor([[0.5, 0.5, 0.25], [0.0, 0.0, 1.0]])
    single = torch.tensor([[True, False, False], [False, False, True]])
    result = zero_shot_metrics(audio, classes, single, multi_label=False, ks=(1, 2))
    assert result["zs/top1"].item() == 50 and result["zs/top2"].item() == 100
    # Multi-label, class 0 column (0.5, 0.5, 0.25, 0.5) with positives clips 0 and 2: clip 0 ties
    # with the negative clips 1 and 3, so both go first: ranks 3 and 4, AP = (1/3 + 2/4) / 2.
    # Class 2 column (0.25, 1, 0.25, 0): positive clip 0 ties with the negative clip 2: rank 3, AP 1/3.
    audio = torch.tensor([[0.5, 0.5, 0.25], [0.5, 0.0, 1.0], [0.25, 0.0, 0.25], [0.5, 0.0, 0.0]])
    multi = torch.tensor([[True, False, True], [False, False, False], [True, False, False], [False, False, False]])
    result = zero_shot_metrics(audio, classes, multi, multi_label=True)
    assert result["zs/mAP"].item() == pytest.approx(100 * ((1 / 3 + 2 / 4) / 2 + 1 / 3) / 2)


def test_zero_shot_rejects_bad_input():
    audio, classes, targets = classification_data(950)
    with pytest.raises(ValueError, match="exactly one class"):
        zero_shot_metrics(audio, classes, targets | targets.roll(1, 1), multi_label=False)
    with pytest.raises(ValueError, match="no class has a positive"):
        zero_shot_metrics(audio, classes, torch.zeros_like(targets), multi_label=True)
    with pytest.raises(ValueError, match="targets must have shape"):
        zero_shot_metrics(audio, classes, targets[:, :3], multi_label=False)
    with pytest.raises(ValueError, match="NaN"):
        zero_shot_metrics(audio, classes * float("nan"), targets, multi_label=False)
    with pytest.raises(TypeError, match="compute_with"), pytest.warns(UserWarning, match="before the ``update``"):
        ZeroShotClassification(multi_label=False).compute()


@pytest.mark.parametrize("multi_label", [False, True])
def test_zero_shot_metric_deduplicates_and_adds_sizes_and_chance(multi_label):
    audio, classes, targets = classification_data(960, num_clips=23, multi_label=multi_label)
    metric = ZeroShotClassification(multi_label=multi_label)
    clips = list(range(23)) + [0, 1]  # a padded distributed sampler repeats the first clips
    for batch in torch.tensor(clips).split(6):
        metric.update(audio[batch], batch + 100, targets[batch])
    result = metric.compute_with(classes)
    expected = zero_shot_metrics(audio, classes, targets, multi_label)
    assert all(torch.equal(result[k], v) for k, v in expected.items())
    assert [result[k].item() for k in ("n_audios", "n_texts", "n_queries")] == [23, 7, 23]
    if multi_label:
        # chance AP of each class with p positives among 23 clips, by enumerating its positions
        positives = [int(p) for p in targets.sum(0) if p > 0]
        expected_ap = [float(chance.average_precision(23, p)) for p in positives]
        assert result["chance/zs/mAP"].item() == pytest.approx(100 * sum(expected_ap) / len(expected_ap), rel=1e-6)
        assert sorted(result) == ["chance/zs/mAP", "n_audios", "n_queries", "n_texts", "zs/mAP"]
    else:
        assert result["chance/zs/top1"].item() == pytest.approx(100 / 7)
        assert result["chance/zs/top5"].item() == pytest.approx(500 / 7)


# ---------------------------------------------------------------------------------------------
# Chance formulas against every placement of the relevant items
# ---------------------------------------------------------------------------------------------


def exhaustive(n, m, cutoff=10, ks=(1, 2, 3, 5, 10)):
    """Exact expectations over the C(n, m) equally likely sets of relevant ranks (a uniformly random
    order of the candidates puts the relevant items at each set of positions equally often)."""
    totals = {"ap": Fraction(0), "best": Fraction(0), **{k: Fraction(0) for k in ks}}
    placements = list(itertools.combinations(range(1, n + 1), m))
    for ranks in placements:
        totals["ap"] += Fraction(sum(Fraction(i + 1, r) for i, r in enumerate(ranks) if r <= cutoff), m)
        totals["best"] += ranks[0]
        for k in ks:
            totals[k] += ranks[0] <= k
    return {key: value / len(placements) for key, value in totals.items()}


@pytest.mark.parametrize("n", range(1, 9))
def test_chance_formulas_equal_exhaustive_expectations(n):
    for m in range(1, n + 1):
        for cutoff in (3, 10):
            exact = exhaustive(n, m, cutoff)
            assert chance.average_precision(n, m, cutoff).item() == pytest.approx(float(exact["ap"]), abs=1e-12)
        full = exhaustive(n, m, cutoff=n)["ap"]
        assert chance.average_precision(n, m).item() == pytest.approx(float(full), abs=1e-12)
        assert chance.mean_best_rank(n, m).item() == pytest.approx(float(exact["best"]), abs=1e-12)
        for k in (1, 2, 3, 5, 10):
            assert chance.recall_at_k(n, m, k).item() == pytest.approx(float(exact[k]), abs=1e-12), (n, m, k)


@pytest.mark.parametrize("n", range(2, 9))
def test_hard_negative_chance_equals_exhaustive_expectation(n):
    pairs = list(itertools.permutations(range(1, n + 1), 2))  # (rank of target, rank of negative)
    for k in (1, 2, 3, 5, 10):
        exact = Fraction(sum(t <= k < negative for t, negative in pairs), len(pairs))
        assert chance.hard_negative_success(n, k).item() == pytest.approx(float(exact), abs=1e-12), (n, k)


def test_chance_vectorised_over_queries_and_large_sets():
    n, m = 5000, torch.tensor([1, 5, 20])
    # R@1 = m / n; R@n = 1; E[AP] for m = 1 is H_n / n
    assert torch.allclose(chance.recall_at_k(n, m, 1), m.double() / n)
    assert torch.allclose(chance.recall_at_k(n, m, n), torch.ones(3, dtype=torch.float64))
    harmonic = sum(1 / r for r in range(1, n + 1))
    assert chance.average_precision(n, 1).item() == pytest.approx(harmonic / n, rel=1e-12)
    with pytest.raises(ValueError, match="relevant"):
        chance.recall_at_k(3, 4, 1)


# ---------------------------------------------------------------------------------------------
# Simulation: random rankings through the Metric classes average to their chance levels
# ---------------------------------------------------------------------------------------------


def _mean_and_bound(values):
    values = torch.tensor(values, dtype=torch.float64)
    return values.mean().item(), 5 * values.std().item() / len(values) ** 0.5 + 1e-9


def test_random_retrieval_averages_to_the_reported_chance():
    g = torch.Generator().manual_seed(970)
    audio_emb, audio_ids, text_emb, text_ids, text_keys = make_dataset(30, 4, (1, 5), g)
    metric = AudioTextRetrieval(text_text=True)
    metric.update(audio_emb, audio_ids, text_emb, text_ids, text_keys)
    reported = {k: v.item() for k, v in metric.compute().items() if k.startswith("chance/")}
    runs = []
    for _ in range(150):
        # One-hot audios against Gaussian captions: every score is an independent random number, so
        # each query ranks its candidates in a uniformly random order.
        text = torch.randn(text_ids.numel(), 30, generator=g)
        runs.append({**retrieval_metrics(torch.eye(30), audio_ids, text, text_ids, text_keys),
                     **text_text_metrics(text, text_ids, text_keys)})  # fmt: skip
    assert {k.split("/")[1] for k in reported} == {"t2a", "a2t", "t2t"}
    for key, value in reported.items():
        mean, bound = _mean_and_bound([run[key.removeprefix("chance/")].item() for run in runs])
        assert abs(mean - value) <= bound, (key, mean, value, bound)


@pytest.mark.parametrize("multi_label", [False, True])
def test_random_classification_averages_to_the_reported_chance(multi_label):
    audio, classes, targets = classification_data(980, num_clips=9, num_classes=6, multi_label=multi_label)
    metric = ZeroShotClassification(multi_label=multi_label)
    metric.update(audio, torch.arange(9), targets)
    reported = {k: v.item() for k, v in metric.compute_with(classes).items() if k.startswith("chance/")}
    g = torch.Generator().manual_seed(981)
    runs = [zero_shot_metrics(torch.randn(9, 6, generator=g), torch.eye(6), targets, multi_label) for _ in range(3000)]
    for key, value in reported.items():
        mean, bound = _mean_and_bound([run[key.removeprefix("chance/")].item() for run in runs])
        assert abs(mean - value) <= bound, (key, mean, value, bound)
