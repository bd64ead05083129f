"""Chunked top-k search equals a float64 brute-force ranking (loops over queries, ties by corpus index)."""

import json

import pytest
import torch
from references import topk_reference
from safetensors.torch import save_file

from lightning_modules.tools.search import ids_path, main, topk_search


def brute_force(queries, corpus, k):
    """The float64 loop reference, as tensors in the queries' dtype."""
    scores, indices = topk_reference(queries, corpus, k)
    return torch.tensor(scores, dtype=queries.dtype), torch.tensor(indices)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 10_000])
def test_matches_brute_force(chunk_size):
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(13, 8, generator=generator, dtype=torch.float64), dim=-1)
    corpus = torch.nn.functional.normalize(torch.randn(50, 8, generator=generator, dtype=torch.float64), dim=-1)
    scores, indices = topk_search(queries, corpus, 5, chunk_size)
    expected_scores, expected_indices = brute_force(queries, corpus, 5)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 100])
def test_ties_break_by_corpus_index(chunk_size):
    # Small integers make every score exact, so ties are real ties in both computations.
    generator = torch.Generator().manual_seed(1)
    base = torch.randint(-1, 2, (4, 3), generator=generator).float()
    corpus = base[torch.randint(0, 4, (40,), generator=generator)]  # many duplicate rows
    queries = torch.randint(-1, 2, (9, 3), generator=generator).float()
    scores, indices = topk_search(queries, corpus, 12, chunk_size)
    expected_scores, expected_indices = brute_force(queries, corpus, 12)
    assert torch.equal(scores, expected_scores)
    assert torch.equal(indices, expected_indices)
    # Within equal scores, indices ascend.
    same = scores[:, 1:] == scores[:, :-1]
    assert (indices[:, 1:] > indices[:, :-1])[same].all()


def test_k_larger_than_corpus_and_bad_input():
    scores, indices = topk_search(torch.eye(3), torch.eye(3)[:2], k=10)
    assert scores.shape == indices.shape == (3, 2)
    with pytest.raises(ValueError, match="need"):
        topk_search(torch.zeros(2, 3), torch.zeros(4, 5), k=1)
    with pytest.raises(ValueError, match="k and chunk_size"):
        topk_search(torch.zeros(2, 3), torch.zeros(4, 3), k=0)


def test_cli_on_files_without_ids(tmp_path, capsys):
    corpus = torch.eye(4)
    save_file({"audio": corpus}, str(tmp_path / "corpus.safetensors"))
    save_file({"text": corpus[[2, 0]] * 0.5}, str(tmp_path / "queries.safetensors"))
    assert not ids_path(tmp_path / "corpus.safetensors").exists()
    files = ["--queries", str(tmp_path / "queries.safetensors"), "--corpus", str(tmp_path / "corpus.safetensors")]
    records = main([*files, "--k", "2"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == records
    assert [r["results"][0] for r in records] == [{"id": "2", "score": 0.5}, {"id": "0", "score": 0.5}]
    with pytest.raises(KeyError, match="no tensor"):
        main([*files, "--corpus_key", "missing"])
