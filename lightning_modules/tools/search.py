"""Exact top-k retrieval by chunked matrix products, and the ``python main.py search`` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


def ids_path(embeddings_path: str | Path) -> Path:
    """The JSON of ids and texts that goes with an embeddings file (same name, ``.json``)."""
    return Path(embeddings_path).with_suffix(".json")


def topk_search(
    queries: torch.Tensor, corpus: torch.Tensor, k: int, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest dot-product scores of every query over the corpus, exactly.

    Scores ``queries @ corpus.T`` are computed ``chunk_size`` queries × ``chunk_size`` corpus rows
    at a time (memory ``chunk_size²``), and each chunk's best ``k`` are merged into the running
    best. Order: score descending; equal scores by corpus index ascending, the order of a stable
    sort of the full score matrix. Sorting (not ``torch.topk``, whose choice among ties is
    unspecified) keeps that order exact across chunk boundaries.

    Args:
        queries: ``(Q, D)`` query embeddings (normalise them for cosine similarity).
        corpus: ``(N, D)`` corpus embeddings on the same device.
        k: results per query; at most ``N`` are returned.
        chunk_size: rows of queries and of corpus per matrix product.

    Returns:
        ``scores`` ``(Q, min(k, N))`` in the promoted dtype of the inputs, and ``indices``
        ``(Q, min(k, N))`` int64 rows of ``corpus``.
    """
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"need (Q, D) queries and (N, D) corpus, got {tuple(queries.shape)} and {tuple(corpus.shape)}")
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k and chunk_size must be >= 1, got {k} and {chunk_size}")
    k = min(k, corpus.shape[0])
    dtype = torch.promote_types(queries.dtype, corpus.dtype)
    all_scores, all_indices = [], []
    for q in queries.to(dtype).split(chunk_size):
        best_scores = q.new_empty(q.shape[0], 0)
        best_indices = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
        for start in range(0, corpus.shape[0], chunk_size):
            chunk = corpus[start : start + chunk_size].to(dtype)
            scores = q @ chunk.T
            indices = torch.arange(start, start + chunk.shape[0], device=q.device).expand_as(scores)
            # Earlier chunks come first, so a stable sort keeps lower corpus indices first on ties.
            scores = torch.cat([best_scores, scores], dim=1)
            indices = torch.cat([best_indices, indices], dim=1)
            scores, order = scores.sort(dim=1, descending=True, stable=True)
            best_scores, best_indices = scores[:, :k], indices.gather(1, order[:, :k])
        all_scores.append(best_scores)
        all_indices.append(best_indices)
    return torch.cat(all_scores), torch.cat(all_indices)


def read_embeddings(path: str | Path, key: str) -> tuple[torch.Tensor, list[str], list[str] | None]:
    """Tensor ``key`` of an embeddings file with its ids and texts from the JSON beside it.

    Without the JSON (or without an entry for ``key``) the ids are the row numbers.
    """
    with safe_open(str(path), framework="pt") as handle:
        if key not in handle.keys():
            raise KeyError(f"{path} has no tensor {key!r}; it has {sorted(handle.keys())}")
        tensor = handle.get_tensor(key)
    side = {}
    if ids_path(path).is_file():
        side = json.loads(ids_path(path).read_text()).get(key, {})
    ids = side.get("ids") or [str(i) for i in range(tensor.shape[0])]
    if len(ids) != tensor.shape[0]:
        raise ValueError(f"{ids_path(path)} lists {len(ids)} ids for the {tensor.shape[0]} rows of {key!r}")
    return tensor, ids, side.get("texts")


def search(
    queries: str | Path,
    corpus: str | Path,
    query_key: str = "text",
    corpus_key: str = "audio",
    k: int = 10,
    chunk_size: int = 4096,
) -> list[dict[str, Any]]:
    """Top-``k`` corpus items of every query, as JSON-able records (see :func:`main`)."""
    q, query_ids, query_texts = read_embeddings(queries, query_key)
    c, corpus_ids, _ = read_embeddings(corpus, corpus_key)
    scores, indices = topk_search(q, c, k, chunk_size)
    records = []
    for row, (row_scores, row_indices) in enumerate(zip(scores.tolist(), indices.tolist())):
        record: dict[str, Any] = {"query": query_ids[row]}
        if query_texts is not None:
            record["query_text"] = query_texts[row]
        record["results"] = [{"id": corpus_ids[i], "score": s} for s, i in zip(row_scores, row_indices)]
        records.append(record)
    return records


def main(args: list[str] | None = None) -> list[dict[str, Any]]:
    """``python main.py search``: print (or write) the top-k corpus items of every query as JSON lines.

    Each line: ``{"query": id, "query_text": text (when known), "results": [{"id": ..., "score": ...}]}``,
    best first.
    """
    parser = argparse.ArgumentParser(
        prog="main.py search", description="Exact top-k search between two embeddings files written by predict."
    )
    parser.add_argument("--queries", required=True, help="embeddings file (.safetensors) of the queries")
    parser.add_argument("--corpus", required=True, help="embeddings file (.safetensors) of the corpus")
    parser.add_argument("--query_key", default="text", help="tensor of the queries file to search with")
    parser.add_argument("--corpus_key", default="audio", help="tensor of the corpus file to search in")
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--chunk_size", type=int, default=4096, help="rows per matrix product (memory)")
    parser.add_argument("--output", default=None, help="write JSON lines here instead of printing them")
    options = parser.parse_args(args)
    records = search(options.queries, options.corpus, options.query_key, options.corpus_key, options.k,
                     options.chunk_size)
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if options.output is None:
        sys.stdout.write(lines)
    else:
        Path(options.output).parent.mkdir(parents=True, exist_ok=True)
        Path(options.output).write_text(lines)
        print(f"{len(records)} queries, top {options.k}, written to {options.output}")
    return records
