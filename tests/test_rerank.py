"""The re-ranker: losses against their formulas, label-free fusion, metrics of a score matrix against the
brute-force references, the shared-prefix path against the plain one, training groups and bad input."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamodules.rerank import RerankCollator, RerankPrompts
from builders import tiny_backbone
from lightning_modules import QwenOmniThinker, RerankModule
from lightning_modules.metrics import score_matrix_metrics
from references import retrieval_reference, score_matrix_reference
from lightning_modules.rerank import fuse, last_positions
from losses import ListwiseSoftmax, PointwiseYesNo, RerankScores

PROMPTS = RerankPrompts()
CAPTIONS = ["a dog barks twice", "rain on a roof", "a siren then a knock on a door", "two clicks", "a hum"]


def wave(seed: int, seconds: float = 0.6) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)


def scores_of(n: int, group_size: int, seed: int = 0) -> RerankScores:
    g = torch.Generator().manual_seed(seed)
    return RerankScores(torch.randn(n, 2, generator=g, dtype=torch.float64),
                        torch.randn(n, generator=g, dtype=torch.float64).abs() + 3.0, group_size)


# ---------- losses ----------


def test_pointwise_loss_is_the_answer_token_cross_entropy():
    scores = scores_of(6, 3)
    yes, no = scores.yes_no[:, 0].tolist(), scores.yes_no[:, 1].tolist()
    lse = scores.log_normaliser.tolist()
    # positives at 0 and 3 answer "Yes", the others "No"
    answer = [yes[i] if i % 3 == 0 else no[i] for i in range(6)]
    vocabulary = sum(lse[i] - answer[i] for i in range(6)) / 6
    two_way = sum(math.log(math.exp(yes[i]) + math.exp(no[i])) - answer[i] for i in range(6)) / 6
    assert PointwiseYesNo("vocabulary")(scores).loss.item() == pytest.approx(vocabulary, rel=1e-6)
    assert PointwiseYesNo("yes_no")(scores).loss.item() == pytest.approx(two_way, rel=1e-6)


def test_listwise_loss_is_the_softmax_over_each_group():
    scores = scores_of(6, 3)
    z = (scores.yes_no[:, 0] - scores.yes_no[:, 1]).tolist()
    tau = 0.5
    expected = 0.0
    for g in range(2):
        logits = [z[3 * g + j] / tau for j in range(3)]
        expected += math.log(sum(math.exp(v) for v in logits)) - logits[0]
    assert ListwiseSoftmax(temperature=tau)(scores).loss.item() == pytest.approx(expected / 2, rel=1e-6)
    with pytest.raises(ValueError, match="negative"):
        ListwiseSoftmax()(scores_of(2, 1))


def test_losses_run_in_float32_under_autocast():
    scores = scores_of(4, 2)
    plain = PointwiseYesNo()(RerankScores(scores.yes_no.float(), scores.log_normaliser.float(), 2)).loss
    with torch.autocast("cpu", torch.bfloat16):
        auto = PointwiseYesNo()(RerankScores(scores.yes_no.bfloat16(), scores.log_normaliser.bfloat16(), 2)).loss
    assert auto.dtype == torch.float32
    assert auto.item() == pytest.approx(plain.item(), abs=0.05)  # only the bf16 inputs' rounding


# ---------- fusion and metrics ----------


def test_score_matrix_metrics_match_the_retrieval_reference():
    g = torch.Generator().manual_seed(0)
    audio = F.normalize(torch.randn(12, 8, generator=g), dim=-1)
    text = F.normalize(audio.repeat_interleave(5, 0) + 0.9 * torch.randn(60, 8, generator=g), dim=-1)
    # exact ties: round the embeddings to quarters, so float32 and float64 scores are the same numbers
    audio, text = (audio * 4).round() / 4, (text * 4).round() / 4
    clip = torch.arange(12).repeat_interleave(5)
    expected = retrieval_reference(audio, torch.arange(12), text, clip)
    relevant = clip[:, None] == torch.arange(12)[None, :]
    got = {**score_matrix_metrics(text @ audio.T, relevant, "t2a"), **score_matrix_metrics(audio @ text.T, relevant.T, "a2t")}
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].item() == pytest.approx(expected[key], abs=1e-4), key


@pytest.mark.parametrize("seed", range(3))
def test_score_matrix_metrics_with_any_relevance_and_ties(seed):
    """Queries with 1 to 12 relevant candidates out of 15, scores on a coarse grid (many exact ties)."""
    g = torch.Generator().manual_seed(10 + seed)
    scores = torch.randint(-3, 4, (9, 15), generator=g).float() / 4
    relevant = torch.rand(9, 15, generator=g) < torch.linspace(0.05, 0.8, 9)[:, None]
    relevant[torch.arange(9), torch.randint(0, 15, (9,), generator=g)] = True  # every query has one
    got = score_matrix_metrics(scores, relevant, "m", chunk_size=4)
    expected = score_matrix_reference(scores, relevant, "m")
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].item() == pytest.approx(value, abs=1e-4), key


def test_fusion_adds_alpha_p_to_every_top_k_candidate_and_reads_no_labels():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 9, generator=g)
    candidates = scores.topk(4, dim=1).indices
    p = torch.rand(6, 4, generator=g)
    fused = fuse(scores, candidates, p, 0.7)
    expected = scores.clone()
    for q in range(6):
        for j, c in enumerate(candidates[q].tolist()):
            expected[q, c] += 0.7 * p[q, j]
    assert torch.equal(fused, expected)
    # Label-free: the fused scores are a function of (s, top k, p, α) alone, so permuting which
    # candidate is relevant changes the metrics but not one fused score.
    relevant = torch.zeros(6, 9, dtype=torch.bool)
    relevant[torch.arange(6), torch.arange(6)] = True
    permuted = relevant[:, torch.randperm(9, generator=g)]
    assert torch.equal(fuse(scores, candidates, p, 0.7), fused)
    assert score_matrix_metrics(fused, relevant, "x") != score_matrix_metrics(fused, permuted, "x")


def test_evaluation_is_label_free_end_to_end(monkeypatch, tiny_reranker_backbone):
    """Through the module's evaluation: the same clips and the same caption texts in the same order,
    but the captions owned by other clips (other relevance labels), give the same fused scores."""
    module = RerankModule(tiny_reranker_backbone(), k=3, alpha_t2a=0.5, alpha_a2t=0.5)
    texts = [f"{caption} {i}" for i in range(2) for caption in CAPTIONS]

    def clips(counts: list[int]) -> list[dict]:
        starts = np.cumsum([0, *counts])
        return [{"clip_id": f"c{i}", "clip_index": i, "audio": wave(i), "captions": texts[starts[i]:starts[i + 1]]}
                for i in range(len(counts))]

    g = torch.Generator().manual_seed(0)
    audio_emb, text_emb = F.normalize(torch.randn(5, 8, generator=g), dim=-1), F.normalize(torch.randn(10, 8, generator=g), dim=-1)
    monkeypatch.setattr(module, "_embed_set", lambda waves, captions: (audio_emb, text_emb))
    matrices, relevance = [], []

    def record(scores, relevant, prefix):
        matrices.append(scores.clone())
        relevance.append(relevant.clone())
        return {}

    monkeypatch.setattr("lightning_modules.rerank.score_matrix_metrics", record)
    for counts in ([2, 2, 2, 2, 2], [3, 1, 2, 1, 3]):
        module._clips = clips(counts)
        module._evaluate("test", choose_alpha=False)
    before, after = matrices[:4], matrices[4:]
    assert len(before) == len(after) == 4  # per direction: embedding-only, fused
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    assert not torch.equal(relevance[0], relevance[4])  # the labels did change


# ---------- scoring ----------


@pytest.mark.parametrize("kind", ["qwen", "midashenglm"])
def test_shared_prefix_scores_equal_the_plain_path(kind, tiny_reranker_backbone):
    backbone = tiny_reranker_backbone(manual_seed=0) if kind == "qwen" else tiny_backbone(kind, manual_seed=0)
    module = RerankModule(backbone, k=3).eval()
    pairs = [PROMPTS.pair("a2t", wave(0), caption) for caption in CAPTIONS]
    inputs = module.collate.backbone_collator(pairs)
    with torch.no_grad():
        plain = module.score(inputs)
        cached = module.score_with_prefix(inputs)
        alone = torch.cat([module.score(module.collate.backbone_collator([pair])).yes_no for pair in pairs])
    torch.testing.assert_close(cached.yes_no, plain.yes_no, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain.yes_no, alone, atol=1e-5, rtol=0)  # padding does not change a score
    torch.testing.assert_close(cached.log_normaliser, plain.log_normaliser, atol=1e-5, rtol=0)


def test_prompts_put_the_audio_where_the_direction_needs_it(tiny_reranker_backbone):
    collator = tiny_reranker_backbone().collator(generation_prompt=True)
    a2t, t2a = PROMPTS.pair("a2t", wave(0), "rain"), PROMPTS.pair("t2a", wave(0), "rain")
    text_a2t, text_t2a = collator.prompts.render(a2t, True), collator.prompts.render(t2a, True)
    assert text_a2t.index("<|audio_bos|>") < text_a2t.index("Candidate:") < text_a2t.index("rain")
    assert text_t2a.index("rain") < text_t2a.index("Candidate:") < text_t2a.index("<|audio_bos|>")
    assert text_a2t.endswith("<|im_start|>assistant\n") and PROMPTS.instruction in text_a2t


def test_last_positions_for_either_padding():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]])
    assert last_positions(mask).tolist() == [2, 2, 1, 0]


def test_training_groups_put_the_positive_first():
    collator = RerankCollator(lambda items: {"n": len(items), "items": items}, PROMPTS)
    item = {"query": type("Q", (), {"audio": wave(0)})(), "documents": [type("D", (), {"text": "rain"})()],
            "clip_id": "c0", "clip_index": 0}
    batch = collator([dict(item, direction="a2t", negatives=["a hum", "two clicks"]),
                      dict(item, direction="t2a", negatives=[wave(1), wave(2)])])
    assert batch["group_size"] == 3 and batch["inputs"]["n"] == 6
    prompts = batch["inputs"]["items"]
    assert prompts[0].text.endswith("rain") and prompts[1].text.endswith("a hum")
    assert prompts[3].audio is item["query"].audio and prompts[4].audio is not item["query"].audio
    assert all("rain" in p.text for p in prompts[3:])


def test_a_module_without_lm_head_or_with_a_bad_k_is_refused(tiny_reranker_backbone):
    with pytest.raises(ValueError, match="lm_head"):
        RerankModule(QwenOmniThinker(tiny=True))
    with pytest.raises(ValueError, match="k must"):
        RerankModule(tiny_reranker_backbone(), k=0)


def test_k_above_the_candidate_count_names_it(monkeypatch, tiny_reranker_backbone):
    module = RerankModule(tiny_reranker_backbone(), k=4)
    monkeypatch.setattr(module, "_embed_set", lambda waves, captions: (torch.eye(3), torch.eye(3)))
    module._clips = [{"clip_id": f"c{i}", "clip_index": i, "audio": wave(i), "captions": [CAPTIONS[i]]} for i in range(3)]
    with pytest.raises(ValueError, match="k = 4 exceeds the 3 candidates"):
        module._evaluate("val", choose_alpha=True)
