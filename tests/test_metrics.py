"""AudioTextRetrieval against a brute-force reference, hand-worked values, dedup and DDP gathering."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from references import ranked, retrieval_reference, summary

from lightning_modules import metrics
from lightning_modules.metrics import (
    AudioTextRetrieval,
    QARetrievalAccuracy,
    ZeroShotClassification,
    hard_negative_metrics,
    qa_accuracy,
    retrieval_metrics,
    text_text_metrics,
    zero_shot_metrics,
)

KEYS = [f"{d}/{m}" for d in ("t2a", "a2t") for m in ("R@1", "R@5", "R@10", "mAP@10", "medr", "meanr")]


def model_values(result):
    """The model's metrics of a Metric class's result, without the set sizes and chance levels."""
    return {k: v for k, v in result.items() if not k.startswith("chance/") and not k.startswith("n_")}


def assert_matches(result, expected):
    assert sorted(result) == sorted(KEYS)
    for key in KEYS:
        assert result[key].dtype == torch.float32 and result[key].ndim == 0
        assert result[key].item() == pytest.approx(expected[key], abs=1e-4), key


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def make_dataset(num_audio, dim, captions, generator, levels=None, duplicate_rows=0):
    """Random retrieval set with ``captions`` = (low, high) captions per audio.

    With ``levels`` the embeddings take values in {-1, ..., 1} / levels: every dot product is then
    exact in float32 and float64 alike, so ties are real ties in both the metric and the reference
    (these vectors are not unit-norm, which the ranking does not need). ``duplicate_rows`` copies
    that many caption rows over others to force ties between whole candidates.
    """
    audio_ids = torch.randperm(10 * num_audio, generator=generator)[:num_audio]
    counts = torch.randint(captions[0], captions[1] + 1, (num_audio,), generator=generator)
    text_ids = audio_ids.repeat_interleave(counts)
    text_keys = text_ids * 1000 + torch.cat([torch.arange(int(c)) for c in counts])
    num_text = text_ids.numel()

    def embed(n):
        if levels is None:
            return torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1)
        return torch.randint(-levels, levels + 1, (n, dim), generator=generator).float() / levels

    audio_emb, text_emb = embed(num_audio), embed(num_text)
    if duplicate_rows:
        src = torch.randint(0, num_text, (duplicate_rows,), generator=generator)
        dst = torch.randint(0, num_text, (duplicate_rows,), generator=generator)
        text_emb[dst] = text_emb[src]
        audio_emb[dst % num_audio] = audio_emb[src % num_audio]
    # Shuffle captions so nothing relies on them arriving grouped by clip.
    perm = torch.randperm(num_text, generator=generator)
    return audio_emb, audio_ids, text_emb[perm], text_ids[perm], text_keys[perm]


def integer_rows(n, dim, generator, levels=1):
    """Rows with values in {-levels..levels}: dot products are exact, so equal scores are real ties."""
    return torch.randint(-levels, levels + 1, (n, dim), generator=generator).float()


def qa_data(seed, num_queries=30):
    g = torch.Generator().manual_seed(seed)
    num_choices = torch.randint(1, 5, (num_queries,), generator=g)
    choice_item = torch.arange(num_queries).repeat_interleave(num_choices)
    query_emb = integer_rows(num_queries, 2, g)
    choice_emb = integer_rows(choice_item.numel(), 2, g)  # 9 distinct rows: many exact ties
    starts = num_choices.cumsum(0) - num_choices
    answer = starts + (torch.rand(num_queries, generator=g) * num_choices).long()
    perm = torch.randperm(choice_item.numel(), generator=g)  # choices need not be grouped
    inverse = perm.argsort()
    categories = torch.randint(-1, 2, (num_queries,), generator=g)  # category 2 stays empty
    return query_emb, choice_emb[perm], choice_item[perm], inverse[answer], categories


def qa_batches(seed):
    """One QA set as the data module sends it: item indices, choice keys item * 1000 + j."""
    query_emb, choice_emb, choice_item, answer_choice, categories = qa_data(seed, num_queries=12)
    choice_key = choice_item * 1000 + torch.arange(choice_item.numel())
    item_index = torch.arange(12) + 100
    return query_emb, item_index, choice_emb, choice_item + 100, choice_key, choice_key[answer_choice], categories


def feed_qa(metric, query_emb, item_index, choice_emb, choice_item, choice_key, answer_key, categories, items):
    for batch in torch.tensor(items).split(5):
        mine = torch.isin(choice_item, item_index[batch])
        metric.update(
            query_emb[batch], item_index[batch], choice_emb[mine], choice_item[mine], choice_key[mine],
            answer_key[batch], categories[batch],
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_on_random_unit_vectors(seed):
    g = torch.Generator().manual_seed(seed)
    data = make_dataset(num_audio=40, dim=16, captions=(5, 5), generator=g)
    assert_matches(retrieval_metrics(*data, chunk_size=7), retrieval_reference(*data))


@pytest.fixture(params=["compare", "sort", "sparse"])
def counting(request, monkeypatch):
    """Run a test through each way of counting candidates that score >= a relevant item."""
    monkeypatch.setattr(metrics, "SPARSE_MAX_FRACTION", math.inf if request.param == "sparse" else 0.0)
    if request.param == "sort":
        monkeypatch.setattr(metrics, "COMPARE_MAX_SLOTS", 0)
    return request.param


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels,duplicate_rows", [(1, 0), (2, 0), (4, 30)])
def test_matches_reference_with_many_ties_and_varying_captions(seed, levels, duplicate_rows, counting):
    g = torch.Generator().manual_seed(100 + seed)
    # dim 3 with values in {-1, 0, 1} gives only a handful of distinct scores: ties everywhere.
    data = make_dataset(30, 3, (1, 5), g, levels=levels, duplicate_rows=duplicate_rows)
    assert_matches(retrieval_metrics(*data, chunk_size=8), retrieval_reference(*data))


def test_matches_reference_with_many_captions_per_clip():
    # Up to 12 captions per clip exceeds COMPARE_MAX_SLOTS, so the sort-based count runs unpatched.
    g = torch.Generator().manual_seed(150)
    data = make_dataset(15, 2, (1, 12), g, levels=1, duplicate_rows=10)
    assert torch.unique(data[3], return_counts=True)[1].max() > metrics.COMPARE_MAX_SLOTS
    assert_matches(retrieval_metrics(*data, chunk_size=4), retrieval_reference(*data))


@pytest.mark.parametrize("seed", range(10))
def test_matches_reference_on_tiny_sets(seed, counting):
    # Fewer than 10 candidates: padding slots of short caption lists must not count towards mAP@10.
    g = torch.Generator().manual_seed(200 + seed)
    data = make_dataset(int(torch.randint(1, 4, (1,), generator=g)), 2, (1, 4), g, levels=1)
    assert_matches(retrieval_metrics(*data), retrieval_reference(*data))


def hand_example():
    """2 audios x 4 captions. Audio 0 = (1, 0) and audio 1 = (0, 1), so a caption (x, y) scores x
    against audio 0 and y against audio 1. Captions 0, 1 describe audio 0 (id 10), captions 2, 3
    describe audio 1 (id 20). Dyadic values keep every score exact."""
    audio_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    audio_ids = torch.tensor([10, 20])
    text_emb = torch.tensor([[0.25, 0.75], [1.0, 0.5], [0.5, 0.5], [0.25, 0.5]])
    text_ids = torch.tensor([10, 10, 20, 20])
    text_keys = torch.tensor([0, 1, 2, 3])
    return audio_emb, audio_ids, text_emb, text_ids, text_keys


def test_hand_worked_example():
    # T2A (query caption -> rank of its audio):
    #   c0 (0.25 vs 0.75) -> 2;  c1 (1.0 vs 0.5) -> 1;  c2 (0.5 vs 0.5, tie, pessimistic) -> 2;
    #   c3 (0.25 vs 0.5) -> 1.  Ranks [2, 1, 2, 1]:
    #   R@1 = 50, R@5 = R@10 = 100, mAP@10 = mean(1/2, 1, 1/2, 1) = 75, medr = floor(1.5) = 1,
    #   meanr = 1.5.
    # A2T:
    #   audio 0 scores [0.25, 1.0, 0.5, 0.25]; relevant c0, c1. c1 -> 1. c0 -> 1 + irrelevant >= 0.25
    #     (c2, and c3 by the tie) + relevant above (c1) = 4. Sorted ranks [1, 4]:
    #     AP = (1/1 + 2/4) / 2 = 0.75.
    #   audio 1 scores [0.75, 0.5, 0.5, 0.5]; relevant c2, c3 tie with each other and with
    #     irrelevant c1. Both come after c0 and c1 (2 irrelevant >= 0.5); c2 before c3 by key:
    #     ranks [3, 4]. AP = (1/3 + 2/4) / 2 = 5/12.
    #   Best ranks [1, 3]: R@1 = 50, R@5 = R@10 = 100, mAP@10 = (3/4 + 5/12) / 2 * 100 = 175/3,
    #   medr = floor(2) = 2, meanr = 2.
    expected = {
        "t2a/R@1": 50.0, "t2a/R@5": 100.0, "t2a/R@10": 100.0, "t2a/mAP@10": 75.0,
        "t2a/medr": 1.0, "t2a/meanr": 1.5,
        "a2t/R@1": 50.0, "a2t/R@5": 100.0, "a2t/R@10": 100.0, "a2t/mAP@10": 175 / 3,
        "a2t/medr": 2.0, "a2t/meanr": 2.0,
    }  # fmt: skip
    data = hand_example()
    assert_matches(retrieval_metrics(*data), expected)
    assert retrieval_reference(*data) == pytest.approx(expected)
    metric = AudioTextRetrieval()
    metric.update(*data)
    result = metric.compute()
    assert_matches(model_values(result), expected)
    # Chance, by hand: T2A 2 audios, 1 relevant; A2T 4 captions, 2 relevant. R@1 = 1/2 both ways;
    # A2T AP over the 6 equally likely rank pairs {1,2}, {1,3}, ..., {3,4}:
    # (1 + 5/6 + 3/4 + 7/12 + 1/2 + 5/12) / 6 = 49/72; best rank (4 + 1) / (2 + 1).
    chance = {"n_audios": 2, "n_texts": 4, "chance/t2a/R@1": 50, "chance/t2a/R@5": 100, "chance/t2a/mAP@10": 75,
              "chance/t2a/meanr": 1.5, "chance/a2t/R@1": 50, "chance/a2t/R@5": 100,
              "chance/a2t/mAP@10": 100 * 49 / 72, "chance/a2t/meanr": 5 / 3}  # fmt: skip
    for key, value in chance.items():
        assert result[key].item() == pytest.approx(value), key


def test_map_sorts_relevant_ranks():
    # In the hand example audio 0's captions rank [4, 1] in key order. Pairing hit counts with that
    # order (LAION-CLAP) gives AP = (1/4 + 2/1) / 2 = 1.125 instead of 0.75, so a2t mAP@10 would be
    # (1.125 + 5/12) / 2 * 100 = 77.08 rather than 58.33.
    data = hand_example()
    unsorted = retrieval_reference(*data, sort_ranks=False)["a2t/mAP@10"]
    assert unsorted == pytest.approx((1.125 + 5 / 12) / 2 * 100)
    assert retrieval_metrics(*data)["a2t/mAP@10"].item() == pytest.approx(175 / 3, abs=1e-4)
    assert abs(unsorted - 175 / 3) > 10


def test_all_scores_tied_is_worst_case():
    # Every caption scores the same against every audio: pessimistic ranks put each relevant item
    # behind all irrelevant ones. 3 audios with 1, 2 and 4 captions (7 in all).
    audio_emb = torch.ones(3, 4) / 2
    audio_ids = torch.tensor([0, 1, 2])
    text_ids = torch.tensor([0, 1, 1, 2, 2, 2, 2])
    text_emb = torch.ones(7, 4) / 2
    result = retrieval_metrics(audio_emb, audio_ids, text_emb, text_ids, torch.arange(7))
    # T2A: each caption's audio is behind the 2 other audios -> rank 3 for all.
    assert result["t2a/R@1"] == 0 and result["t2a/R@5"] == 100 and result["t2a/medr"] == 3
    assert result["t2a/mAP@10"].item() == pytest.approx(100 / 3, abs=1e-4)
    # A2T: relevant captions take the last n_rel places of 7 -> ranks {7}, {6, 7}, {4, 5, 6, 7}.
    # AP: 1/7;  (1/6 + 2/7) / 2;  (1/4 + 2/5 + 3/6 + 4/7) / 4.  Best ranks 7, 6, 4.
    aps = [1 / 7, (1 / 6 + 2 / 7) / 2, (1 / 4 + 2 / 5 + 3 / 6 + 4 / 7) / 4]
    assert result["a2t/mAP@10"].item() == pytest.approx(100 * sum(aps) / 3, abs=1e-4)
    assert result["a2t/R@1"] == 0 and result["a2t/R@5"] == pytest.approx(100 / 3)
    assert result["a2t/medr"] == 6 and result["a2t/meanr"].item() == pytest.approx(17 / 3)


def test_chunk_size_does_not_change_results(counting):
    g = torch.Generator().manual_seed(7)
    data = make_dataset(37, 4, (1, 5), g, levels=2, duplicate_rows=10)
    full = retrieval_metrics(*data, chunk_size=1024)
    for chunk_size in (1, 2, 5, 36, 37, 38):
        result = retrieval_metrics(*data, chunk_size=chunk_size)
        assert all(torch.equal(result[k], full[k]) for k in KEYS), chunk_size


@pytest.mark.parametrize("seed", range(3))
def test_query_types_match_reference(seed):
    g = torch.Generator().manual_seed(40 + seed)
    audio_emb, audio_ids, text_emb, text_ids, text_keys = make_dataset(15, 3, (1, 5), g, levels=1, duplicate_rows=6)
    groups = torch.randint(-1, 3, text_ids.shape, generator=g)  # type 2 may stay empty; -1 is untyped
    groups[groups == 2] = 1
    names = ["keyphrase", "question", "negative"]
    data = audio_emb, audio_ids, text_emb, text_ids, text_keys
    result = retrieval_metrics(*data, text_groups=groups, group_names=names)
    scores = (text_emb.double() @ audio_emb.double().T).tolist()
    audios = list(range(audio_ids.numel()))
    ranks = []
    for q in range(text_ids.numel()):
        (target,) = [i for i in audios if audio_ids[i] == text_ids[q]]
        ranks.append(ranked(audios, scores[q], {target}, audios).index(target) + 1)
    for index, name in enumerate(names):
        mine = [r for r, group in zip(ranks, groups.tolist()) if group == index]
        if not mine:
            assert not any(k.startswith(f"t2a/{name}/") for k in result)
            continue
        expected = summary(mine, [1 / r if r <= 10 else 0.0 for r in mine])
        for key, value in expected.items():
            assert result[f"t2a/{name}/{key}"].item() == pytest.approx(value, abs=1e-4), (name, key)
    overall = retrieval_metrics(*data)
    assert all(torch.equal(result[k], overall[k]) for k in KEYS)  # the overall numbers are unchanged
    with pytest.raises(ValueError, match="text_groups out of range"):
        retrieval_metrics(*data, text_groups=groups, group_names=names[:1])


def test_direction_names_only_rename_keys():
    data = hand_example()
    default = retrieval_metrics(*data)
    speech = retrieval_metrics(*data, names=("t2s", "s2t"))
    assert sorted(speech) == sorted(k.replace("t2a", "t2s").replace("a2t", "s2t") for k in default)
    assert all(torch.equal(speech[k.replace("t2a", "t2s").replace("a2t", "s2t")], v) for k, v in default.items())
    with pytest.raises(ValueError, match="names"):
        retrieval_metrics(*data, names=("t2a", "t2a"))
    with pytest.raises(ValueError, match="block_size"):
        retrieval_metrics(*data, block_size=0)


class ScoreBlocks(torch.Tensor):
    """Candidates that record the shape of every score block multiplied out of them."""

    shapes: list[tuple[int, ...]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if getattr(func, "__name__", None) in ("matmul", "__matmul__", "mm"):
            cls.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("num_probes", [1, 3, 11])
def test_probe_counts_against_brute_force_and_block_budget(num_probes, counting, monkeypatch):
    g = torch.Generator().manual_seed(13)
    queries = torch.randint(-1, 2, (10, 3), generator=g).float()
    candidates = torch.randint(-1, 2, (23, 3), generator=g).float()
    # 5 blocks of 5 candidates (the last holds 3), 3 chunks of 4 queries: chunk 0 probes only block
    # 0, chunk 1 blocks 1 and 3, chunk 2 has no valid probe at all.
    probe_index = torch.randint(0, 5, (10, num_probes), generator=g)
    probe_index[4:8] += torch.where(torch.rand(4, num_probes, generator=g) < 0.5, 5, 15)
    probe_valid = torch.rand(10, num_probes, generator=g) < 0.8
    probe_valid[4:8, 0] = True
    probe_index[4:6, 0] = torch.tensor([5, 15])
    probe_valid[8:] = False
    strict = torch.rand(10, num_probes, generator=g) < 0.5

    monkeypatch.setattr(ScoreBlocks, "shapes", [])
    scores, counts = metrics._probe_counts(
        queries, candidates.as_subclass(ScoreBlocks), probe_index, probe_valid, strict, chunk_size=4, block_size=5
    )
    full = queries @ candidates.T
    for q in range(10):
        for p in range(num_probes):
            if probe_valid[q, p]:
                v = full[q, probe_index[q, p]]
                assert scores[q, p] == v
                assert counts[q, p] == ((full[q] > v) if strict[q, p] else (full[q] >= v)).sum()
    # Every block once per chunk, plus the probe blocks of pass 1 except the one reused: 5 + 0,
    # 5 + 1 and 5 + 0 products, none larger than chunk_size x block_size.
    assert len(ScoreBlocks.shapes) == 16
    assert all(rows <= 4 and cols <= 5 for rows, cols in ScoreBlocks.shapes)


def test_invariant_to_input_order():
    g = torch.Generator().manual_seed(8)
    audio_emb, audio_ids, text_emb, text_ids, text_keys = make_dataset(25, 3, (1, 5), g, levels=1)
    pa, pt = torch.randperm(25, generator=g), torch.randperm(text_ids.numel(), generator=g)
    a = retrieval_metrics(audio_emb, audio_ids, text_emb, text_ids, text_keys)
    b = retrieval_metrics(audio_emb[pa], audio_ids[pa], text_emb[pt], text_ids[pt], text_keys[pt])
    assert all(torch.equal(a[k], b[k]) for k in KEYS)


def test_metric_deduplicates_repeated_audios_and_captions():
    g = torch.Generator().manual_seed(9)
    audio_emb, audio_ids, text_emb, text_ids, text_keys = make_dataset(20, 3, (1, 5), g, levels=1)
    expected = retrieval_metrics(audio_emb, audio_ids, text_emb, text_ids, text_keys)

    metric = AudioTextRetrieval(chunk_size=6)
    metric.update(audio_emb, audio_ids, text_emb, text_ids, text_keys)
    # Repeats as a padded sampler would send them; the text-only and audio-only updates also check
    # that an update may carry one side only.
    metric.update(audio_emb[:3], audio_ids[:3], text_emb[:0], text_ids[:0], text_keys[:0])
    metric.update(audio_emb[:0], audio_ids[:0], text_emb[-4:], text_ids[-4:], text_keys[-4:])
    result = metric.compute()
    assert all(torch.equal(result[k], expected[k]) for k in KEYS)

    # Without dedup the repeats would change the numbers (extra, tied candidates).
    with pytest.raises(ValueError, match="unique"):
        retrieval_metrics(
            torch.cat([audio_emb, audio_emb[:3]]), torch.cat([audio_ids, audio_ids[:3]]),
            text_emb, text_ids, text_keys,
        )  # fmt: skip


def test_metric_accumulates_batches_and_resets():
    g = torch.Generator().manual_seed(10)
    audio_emb, audio_ids, text_emb, text_ids, text_keys = make_dataset(12, 8, (2, 5), g)
    metric = AudioTextRetrieval()
    for part in torch.arange(12).chunk(4):
        captions = torch.isin(text_ids, audio_ids[part])
        metric.update(
            audio_emb[part].bfloat16(), audio_ids[part],
            text_emb[captions].bfloat16(), text_ids[captions], text_keys[captions],
        )  # fmt: skip
    # bfloat16 storage is scored in float32: same result as feeding the rounded values directly.
    rounded = audio_emb.bfloat16().float(), audio_ids, text_emb.bfloat16().float(), text_ids
    expected = retrieval_metrics(*rounded, text_keys)
    result = metric.compute()
    assert all(torch.equal(result[k], expected[k]) for k in KEYS)
    metric.reset()
    metric.update(*hand_example())
    assert metric.compute()["a2t/mAP@10"].item() == pytest.approx(175 / 3, abs=1e-4)


def test_rejects_inconsistent_inputs():
    audio_emb, audio_ids, text_emb, text_ids, text_keys = hand_example()
    with pytest.raises(ValueError, match="without an audio"):
        retrieval_metrics(audio_emb[:1], audio_ids[:1], text_emb, text_ids, text_keys)
    with pytest.raises(ValueError, match="without any caption"):
        retrieval_metrics(audio_emb, audio_ids, text_emb[:2], text_ids[:2], text_keys[:2])
    with pytest.raises(ValueError, match="unique"):
        retrieval_metrics(audio_emb, audio_ids, text_emb, text_ids, torch.tensor([0, 1, 2, 2]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(audio_emb, audio_ids, text_emb.clone().fill_(float("nan")), text_ids)
    with pytest.raises(ValueError, match="text_keys"):
        AudioTextRetrieval().update(audio_emb, audio_ids, text_emb, text_ids, text_keys[:2])


# ---------------------------------------------------------------------------------------------
# Two gloo processes: gathered compute == single-process compute on everything.
# ---------------------------------------------------------------------------------------------

WORLD_SIZE = 2


def _ddp_dataset():
    return make_dataset(13, 4, (1, 5), torch.Generator().manual_seed(11), levels=2, duplicate_rows=5)


def _ddp_hard_negatives():
    audio_ids = _ddp_dataset()[1]
    return integer_rows(4, 4, torch.Generator().manual_seed(12)), audio_ids[:4], audio_ids[4:8]


def _ddp_query_types(text_keys):
    """-1 (no type), 0 or 1 by caption key."""
    return text_keys % 3 - 1


def _ddp_classification():
    g = torch.Generator().manual_seed(13)
    return integer_rows(13, 4, g), integer_rows(5, 4, g), torch.rand(13, 5, generator=g) < 0.4


def _ddp_worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        audio_emb, audio_ids, text_emb, text_ids, text_keys = _ddp_dataset()
        # DistributedSampler(drop_last=False) pads 13 clips to 14 by repeating clip 0, so rank 1
        # sees clip 0 (audio and captions) a second time.
        clips = list(range(13)) + [0]
        mine = torch.tensor(clips[rank::WORLD_SIZE])
        metric = AudioTextRetrieval(chunk_size=5)
        # Same data through the streaming path with caption-caption and hard-negative metrics.
        extras = AudioTextRetrieval(chunk_size=3, block_size=4, text_text=True)
        for batch in mine.chunk(3):
            captions = torch.isin(text_ids, audio_ids[batch])
            for m in (metric, extras):
                m.update(
                    audio_emb[batch], audio_ids[batch],
                    text_emb[captions], text_ids[captions], text_keys[captions],
                )  # fmt: skip
        result = metric.compute()
        extra = extras.compute_with(_ddp_hard_negatives())
        # QA: 12 items padded to 14 with items 5 and 6 repeated.
        qa = QARetrievalAccuracy(category_names=["a", "b"])
        feed_qa(qa, *qa_batches(14), items=(list(range(12)) + [5, 6])[rank::WORLD_SIZE])
        extra.update(qa.compute())
        # Query types: the caption states gain one more, gathered like the others.
        typed = AudioTextRetrieval(query_types=["keyphrase", "question"])
        for batch in mine.chunk(2):
            captions = torch.isin(text_ids, audio_ids[batch])
            typed.update(audio_emb[batch], audio_ids[batch], text_emb[captions], text_ids[captions],
                         text_keys[captions], _ddp_query_types(text_keys[captions]))  # fmt: skip
        # Zero-shot: 13 clips padded to 14, multi-label targets as uint8 through the gather.
        audio, classes, targets = _ddp_classification()
        zero_shot = ZeroShotClassification(multi_label=True)
        zero_shot.update(audio[mine], mine, targets[mine])
        typed_result, zero_shot_result = typed.compute(), zero_shot.compute_with(classes)  # collectives: every rank
        if rank == 0:
            torch.save({"retrieval": result, "extras": extra, "typed": typed_result, "zs": zero_shot_result}, out_file)
    finally:
        dist.destroy_process_group()


def test_two_process_gather_equals_single_process(tmp_path):
    out_file = tmp_path / "result.pt"
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=WORLD_SIZE)
    saved = torch.load(out_file)
    gathered = saved["retrieval"]
    data = _ddp_dataset()
    expected = retrieval_metrics(*data)
    assert all(torch.equal(gathered[k], expected[k]) for k in KEYS)
    assert_matches(model_values(gathered), retrieval_reference(*data))
    # the padded repeat of clip 0 is counted once
    assert (gathered["n_audios"].item(), gathered["n_texts"].item()) == (13, data[3].numel())

    # compute_with gathers like compute (the hard negatives are used as given on every rank).
    audio_emb, audio_ids, text_emb, text_ids, text_keys = data
    query_emb = _ddp_hard_negatives()[0]
    expected.update(text_text_metrics(text_emb, text_ids, text_keys))
    expected.update(hard_negative_metrics(query_emb, audio_emb, torch.arange(4), torch.arange(4, 8)))
    query_emb, choice_emb, choice_item, answer_choice, categories = qa_data(14, num_queries=12)
    expected.update(qa_accuracy(query_emb, choice_emb, choice_item, answer_choice, categories, ["a", "b"]))
    typed = retrieval_metrics(*data, text_groups=_ddp_query_types(text_keys), group_names=["keyphrase", "question"])
    assert any(k.startswith("t2a/question/") for k in typed)
    assert sorted(model_values(saved["typed"])) == sorted(typed)
    assert all(torch.equal(saved["typed"][k], v) for k, v in typed.items())
    audio, classes, targets = _ddp_classification()
    assert torch.equal(saved["zs"]["zs/mAP"], zero_shot_metrics(audio, classes, targets, True)["zs/mAP"])
    assert saved["zs"]["n_audios"].item() == 13
    assert sorted(model_values(saved["extras"])) == sorted(expected)
    assert all(torch.equal(saved["extras"][k], expected[k]) for k in expected)
    assert saved["extras"]["n_queries"].item() == 12  # the QA set's, which updated the dict last
