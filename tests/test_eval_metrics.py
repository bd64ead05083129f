"""Caption-caption retrieval, hard negatives, QA by retrieval and embedding diagnostics against
brute-force float64 references with exact ties; streaming over candidate blocks; the Metric classes'
dedup and hard-negative path (their two-process gathering is tested in test_metrics.py, which spawns
the processes once for every metric)."""

from __future__ import annotations

import math

import pytest
import torch
from references import diagnostics_reference as reference_diagnostics
from references import hard_negative_reference as reference_hard_negatives
from references import qa_reference as reference_qa
from references import retrieval_reference as reference
from references import text_text_reference as reference_t2t
from test_metrics import (
    counting,  # noqa: F401  (a fixture, requested by name)
    feed_qa,
    integer_rows,
    make_dataset,
    model_values,
    qa_batches,
    qa_data,
)

from lightning_modules.diagnostics import embedding_diagnostics
from lightning_modules.metrics import (
    AudioTextRetrieval,
    QARetrievalAccuracy,
    hard_negative_metrics,
    qa_accuracy,
    retrieval_metrics,
    text_text_metrics,
)

T2T_KEYS = [f"t2t/{m}" for m in ("R@1", "R@5", "R@10", "mAP@10", "medr", "meanr")]


def assert_close(result, expected, keys):
    assert sorted(result) == sorted(keys)
    for key in keys:
        assert result[key].dtype == torch.float32 and result[key].ndim == 0, key
        assert result[key].item() == pytest.approx(expected[key], abs=1e-4), key


# ---------------------------------------------------------------------------------------------
# Caption-caption retrieval
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_text_text_matches_reference_with_ties_and_single_caption_clips(seed):
    g = torch.Generator().manual_seed(300 + seed)
    _, _, text_emb, text_ids, text_keys = make_dataset(25, 3, (1, 5), g, levels=1, duplicate_rows=15)
    assert (torch.unique(text_ids, return_counts=True)[1] == 1).any()  # singletons are candidates only
    result = text_text_metrics(text_emb, text_ids, text_keys, chunk_size=7)
    assert_close(result, reference_t2t(text_emb, text_ids, text_keys), T2T_KEYS)


def test_text_text_hand_example_excludes_the_query():
    # Four identical captions: a, b of clip 0 and c, d of clip 1. For query a, candidates are b, c, d,
    # all tied; the sibling b goes behind the irrelevant c and d -> rank 3. Counting a itself would
    # give 4. Every query is in the same situation: R@1 = 0, mAP@10 = 1/3, medr = meanr = 3.
    emb = torch.ones(4, 2)
    result = text_text_metrics(emb, torch.tensor([0, 0, 1, 1]))
    assert result["t2t/R@1"] == 0 and result["t2t/R@5"] == 100 and result["t2t/medr"] == 3
    assert result["t2t/mAP@10"].item() == pytest.approx(100 / 3, abs=1e-4)
    assert result["t2t/meanr"] == 3


def test_text_text_needs_a_clip_with_two_captions():
    with pytest.raises(ValueError, match="two or more captions"):
        text_text_metrics(torch.eye(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="empty"):
        text_text_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Hard negatives
# ---------------------------------------------------------------------------------------------


def hard_negative_data(seed, num_queries=23, num_audio=17):
    g = torch.Generator().manual_seed(seed)
    audio_emb = integer_rows(num_audio, 3, g)
    audio_emb[5:9] = audio_emb[0]  # duplicated audios: targets and negatives tie exactly
    query_emb = integer_rows(num_queries, 3, g)
    target = torch.randint(0, num_audio, (num_queries,), generator=g)
    negative = (target + torch.randint(1, num_audio, (num_queries,), generator=g)) % num_audio
    return query_emb, audio_emb, target, negative


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_queries", [22, 23])  # even and odd Δ-rank medians
def test_hard_negatives_match_reference(seed, num_queries):
    data = hard_negative_data(400 + seed, num_queries)
    expected = reference_hard_negatives(*data, ks=(1, 3, 10))
    assert_close(hard_negative_metrics(*data, ks=(1, 3, 10), chunk_size=5, block_size=4), expected, list(expected))


def test_hard_negative_hand_example():
    # Audios a0 = a2 = (1, 0), a1 = (0, 1), a3 = (1, 1).
    audio_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    query_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    target = torch.tensor([0, 1, 1, 3])
    negative = torch.tensor([2, 3, 0, 0])
    # q0 scores [1, 0, 1, 1]: target a0 ties with a2 and a3 -> rank_t 3; negative a2 wins ties -> 1.
    # q1 scores [0, 1, 0, 1]: target a1 ties with a3 -> 2; negative a3 -> 1.
    # q2 scores [1, 1, 1, 2]: target a1 behind a3 and tied a0, a2 -> 4; negative a0 behind a3 -> 2.
    # q3 scores [0, 1, 0, 1]: target a3 ties with a1 -> 2; negative a0 behind a1, a3 -> 3.
    # rank_t [3, 2, 4, 2], rank_n [1, 1, 2, 3], Δ [-2, -1, -2, 1]: mean -1, median (-2 + -1) / 2.
    result = hard_negative_metrics(query_emb, audio_emb, target, negative, ks=(1, 2))
    assert result["hn/R@1"] == 0 and result["hn/R@2"] == 50
    assert result["hn/HNSR@2"] == 25  # only q3: target at 2, negative at 3
    assert result["hn/delta_rank_mean"] == -1 and result["hn/delta_rank_median"] == -1.5
    assert result["hn/neg_above_target"] == 75


def test_hard_negatives_reject_bad_indices():
    query_emb, audio_emb, target, negative = hard_negative_data(5)
    with pytest.raises(ValueError, match="target equals negative"):
        hard_negative_metrics(query_emb, audio_emb, target, target)
    with pytest.raises(ValueError, match="out of range"):
        hard_negative_metrics(query_emb, audio_emb, target, negative + audio_emb.shape[0])
    with pytest.raises(ValueError, match="empty"):
        hard_negative_metrics(query_emb[:0], audio_emb, target[:0], negative[:0])


# ---------------------------------------------------------------------------------------------
# QA by retrieval
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_qa_accuracy_matches_reference(seed):
    data = qa_data(500 + seed)
    names = ["sound", "music", "speech"]
    expected = model_values(reference_qa(*data, names))
    assert "qa/accuracy/speech" not in expected
    assert_close(qa_accuracy(*data, category_names=names), expected, list(expected))


def test_qa_ties_count_as_wrong():
    query = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # Question 0: answer ties with a wrong choice -> wrong. Question 1: answer strictly best -> right.
    # Question 2: a single choice -> right whatever it scores.
    choices = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.0], [-1.0, 0.0]])
    choice_item = torch.tensor([0, 0, 1, 1, 2])
    result = qa_accuracy(query, choices, choice_item, torch.tensor([0, 2, 4]))
    assert result["qa/accuracy"].item() == pytest.approx(200 / 3)
    metric = QARetrievalAccuracy()
    metric.update(query, torch.arange(3), choices, choice_item, torch.arange(5), torch.tensor([0, 2, 4]),
                  torch.full((3,), -1))  # fmt: skip
    result = metric.compute()
    assert result["chance/qa/accuracy"].item() == pytest.approx(100 * (1 / 2 + 1 / 2 + 1) / 3)
    assert [result[k].item() for k in ("n_audios", "n_texts", "n_queries")] == [3, 5, 3]


def test_qa_rejects_answer_of_another_question():
    with pytest.raises(ValueError, match="choices of other questions"):
        qa_accuracy(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="together"):
        qa_accuracy(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 0]))


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------


def diagnostics_data(seed):
    g = torch.Generator().manual_seed(seed)
    audio_emb, audio_ids, text_emb, text_ids, _ = make_dataset(30, 6, (1, 4), g)
    text_emb = torch.nn.functional.normalize(text_emb + 0.3, dim=-1)  # a real modality gap
    return audio_emb, audio_ids, text_emb, text_ids


def test_diagnostics_match_numpy_reference():
    data = diagnostics_data(600)
    result = embedding_diagnostics(*data)
    expected = reference_diagnostics(*data)
    assert sorted(result) == sorted(expected)
    for key, value in expected.items():
        assert result[key].dtype == torch.float32 and result[key].item() == pytest.approx(value, rel=1e-5), key
    assert expected["diag/mmd"] > 0.05 and expected["diag/modality_gap"] > 0.5  # the shift is visible


def test_diagnostics_subset_is_deterministic():
    audio_emb, audio_ids, text_emb, text_ids = diagnostics_data(601)
    result = embedding_diagnostics(audio_emb, audio_ids, text_emb, text_ids, max_samples=12, seed=3)
    assert all(torch.equal(result[k], v) for k, v in embedding_diagnostics(
        audio_emb, audio_ids, text_emb, text_ids, max_samples=12, seed=3).items())  # fmt: skip
    # The documented draw: one generator, audio subset first, then text.
    g = torch.Generator().manual_seed(3)
    audio_rows = torch.randperm(audio_emb.shape[0], generator=g)[:12]
    text_rows = torch.randperm(text_emb.shape[0], generator=g)[:12]
    sub = reference_diagnostics(audio_emb[audio_rows], torch.arange(12), text_emb[text_rows], torch.zeros(12))
    full = reference_diagnostics(audio_emb, audio_ids, text_emb, text_ids)
    for key in ("diag/mmd", "diag/uniformity_audio", "diag/uniformity_text"):
        assert result[key].item() == pytest.approx(sub[key], rel=1e-5), key
    for key in ("diag/modality_gap", "diag/alignment"):  # linear: always every row
        assert result[key].item() == pytest.approx(full[key], rel=1e-5), key
    other_seed = embedding_diagnostics(audio_emb, audio_ids, text_emb, text_ids, max_samples=12, seed=4)
    assert other_seed["diag/mmd"] != result["diag/mmd"]


def test_diagnostics_reject_bad_input():
    audio_emb, audio_ids, text_emb, text_ids = diagnostics_data(602)
    with pytest.raises(ValueError, match="at least 2 audio"):
        embedding_diagnostics(audio_emb[:1], audio_ids[:1], text_emb, text_ids)
    with pytest.raises(ValueError, match="without an audio"):
        embedding_diagnostics(audio_emb[1:], audio_ids[1:], text_emb, text_ids)
    with pytest.raises(ValueError, match="NaN"):
        embedding_diagnostics(audio_emb * math.inf, audio_ids, text_emb, text_ids)


# ---------------------------------------------------------------------------------------------
# Streaming over candidate blocks
# ---------------------------------------------------------------------------------------------


def test_block_and_chunk_size_do_not_change_results(counting):
    # Small integer-valued embeddings make every score exact, so streaming over candidate blocks must
    # reproduce the single-block result bit for bit, ties included.
    g = torch.Generator().manual_seed(12)
    data = make_dataset(23, 3, (1, 5), g, levels=2, duplicate_rows=12)
    audio_emb, _, text_emb, text_ids, text_keys = data
    query_emb = torch.randint(-2, 3, (17, 3), generator=g).float() / 2
    target = torch.randint(0, 23, (17,), generator=g)
    negative = (target + torch.randint(1, 23, (17,), generator=g)) % 23
    audio_emb[target[:4]] = audio_emb[negative[:4]]  # target-negative ties

    def run(chunk_size, block_size):
        sizes = {"chunk_size": chunk_size, "block_size": block_size}
        return {
            **retrieval_metrics(*data, **sizes),
            **text_text_metrics(text_emb, text_ids, text_keys, **sizes),
            **hard_negative_metrics(query_emb, audio_emb, target, negative, **sizes),
        }

    full = run(1024, 10_000)
    expected = {
        **reference(*data),
        **reference_t2t(text_emb, text_ids, text_keys),
        **reference_hard_negatives(query_emb, audio_emb, target, negative),
    }
    assert {k: v.item() for k, v in full.items()} == pytest.approx(expected, abs=1e-4)
    for chunk_size in (1, 4, 1024):
        for block_size in (1, 3, 7, text_ids.numel()):
            result = run(chunk_size, block_size)
            assert all(torch.equal(result[k], full[k]) for k in full), (chunk_size, block_size)


# ---------------------------------------------------------------------------------------------
# Metric classes
# ---------------------------------------------------------------------------------------------


def speech_set(seed):
    g = torch.Generator().manual_seed(seed)
    return make_dataset(20, 3, (1, 4), g, levels=1, duplicate_rows=6)


def feed_with_repeats(metric, audio_emb, audio_ids, text_emb, text_ids, text_keys):
    """Batches of 6 clips, then clips 0 and 1 again as a padded distributed sampler would send them."""
    clips = list(range(audio_ids.numel())) + [0, 1]
    for batch in torch.tensor(clips).split(6):
        captions = torch.isin(text_ids, audio_ids[batch])
        metric.update(audio_emb[batch], audio_ids[batch], text_emb[captions], text_ids[captions], text_keys[captions])


def test_audio_text_metric_with_all_extras_equals_functions():
    data = speech_set(700)
    audio_emb, audio_ids, text_emb, text_ids, text_keys = data
    g = torch.Generator().manual_seed(701)
    hn_query = integer_rows(9, 3, g)
    target_rows = torch.randint(0, 20, (9,), generator=g)
    negative_rows = (target_rows + torch.randint(1, 20, (9,), generator=g)) % 20
    hn_target, hn_negative = audio_ids[target_rows], audio_ids[negative_rows]  # clip ids, not rows

    metric = AudioTextRetrieval(chunk_size=4, block_size=5, names=("t2s", "s2t"), text_text=True, diagnostics=True)
    feed_with_repeats(metric, *data)
    plain = metric.compute()
    with_hn = metric.compute_with((hn_query, hn_target, hn_negative))

    expected = retrieval_metrics(*data, names=("t2s", "s2t"))
    expected.update(text_text_metrics(text_emb, text_ids, text_keys))
    hn = hard_negative_metrics(hn_query, audio_emb, target_rows, negative_rows)
    diag = embedding_diagnostics(audio_emb, audio_ids, text_emb, text_ids)

    assert {k.split("/")[0] for k in model_values(plain)} == {"t2s", "s2t", "t2t", "diag"}
    assert {k.split("/")[1] for k in plain if k.startswith("chance/")} == {"t2s", "s2t", "t2t"}
    hn_chance = [f"chance/hn/{m}@{k}" for m in ("HNSR", "R") for k in (1, 5, 10)]
    assert sorted(with_hn) == sorted([*plain, *hn, *hn_chance, "n_queries"])
    # deduplicated sizes; the caption-caption chance counts the other captions only
    assert (with_hn["n_audios"].item(), with_hn["n_texts"].item(), with_hn["n_queries"].item()) == (
        20, text_ids.numel(), 9
    )
    _, counts = torch.unique(text_ids, return_counts=True)
    siblings = torch.cat([torch.full((int(c),), int(c) - 1) for c in counts if c > 1])
    n = text_ids.numel() - 1
    t2t_r1 = sum(m / n for m in siblings.tolist()) / len(siblings)  # P(the top candidate is a sibling)
    assert with_hn["chance/t2t/R@1"].item() == pytest.approx(100 * t2t_r1, rel=1e-5)
    assert with_hn["chance/hn/HNSR@1"].item() == pytest.approx(100 * (19 / 20) / 19, rel=1e-5)
    for key, value in {**expected, **hn}.items():
        assert torch.equal(with_hn[key], value), key
    for key, value in diag.items():  # row order differs after dedup, so float sums may differ in the last bit
        assert with_hn[key].item() == pytest.approx(value.item(), rel=1e-6), key
    # compute() caches its result; compute_with must not be served that cache, and vice versa.
    assert not any(k.startswith("hn/") for k in metric.compute())
    with pytest.raises(ValueError, match="hard-negative negative id 99999"):
        metric.compute_with((hn_query[:1], hn_target[:1], torch.tensor([99999])))


def test_metrics_reject_compute_without_update():
    with pytest.raises(ValueError, match="call update"):
        AudioTextRetrieval().compute_with()
    with pytest.raises(ValueError, match="call update"), pytest.warns(UserWarning, match="before the ``update``"):
        QARetrievalAccuracy().compute()  # torchmetrics' own wrapper warns first


def test_qa_metric_deduplicates_and_matches_function():
    names = ["sound", "music", "speech"]
    data = qa_batches(800)
    metric = QARetrievalAccuracy(category_names=names)
    feed_qa(metric, *data, items=list(range(12)) + [3, 0])
    query_emb, choice_emb, choice_item, answer_choice, categories = qa_data(800, num_queries=12)
    expected = qa_accuracy(query_emb, choice_emb, choice_item, answer_choice, categories, names)
    result = metric.compute()
    assert sorted(model_values(result)) == sorted(expected)
    assert all(torch.equal(result[k], expected[k]) for k in expected)
    reference = reference_qa(query_emb, choice_emb, choice_item, answer_choice, categories, names)
    for key in [k for k in reference if k.startswith("chance/")]:
        assert result[key].item() == pytest.approx(reference[key], abs=1e-4), key
    chance_keys = sorted(k for k in reference if k.startswith("chance/"))
    assert sorted(k for k in result if k.startswith("chance/")) == chance_keys
    no_names = QARetrievalAccuracy()
    feed_qa(no_names, *data, items=range(12))
    assert sorted(no_names.compute()) == ["chance/qa/accuracy", "n_audios", "n_queries", "n_texts", "qa/accuracy"]


def test_qa_metric_rejects_answer_not_among_choices():
    query_emb, item_index, choice_emb, choice_item, choice_key, answer_key, categories = qa_batches(801)
    metric = QARetrievalAccuracy()
    # Item 100's answer key made to point at item 101's first choice: both keys exist in the set.
    answer_key = answer_key.clone()
    answer_key[0] = choice_key[choice_item == 101][0]
    feed_qa(metric, query_emb, item_index, choice_emb, choice_item, choice_key, answer_key, categories, range(12))
    with pytest.raises(ValueError, match="of item 100 is not among that item's choices"):
        metric.compute()
    metric = QARetrievalAccuracy()
    answer_key[0] = 424242
    feed_qa(metric, query_emb, item_index, choice_emb, choice_item, choice_key, answer_key, categories, range(12))
    with pytest.raises(ValueError, match="answer key 424242"):
        metric.compute()
