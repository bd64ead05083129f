"""Latency of ``python main.py serve``: text and clip queries through the JSON API, against the bare
embed + search calls they wrap.

Usage (with the package and the ``serve`` extra installed, or ``PYTHONPATH=.``), with the arguments
of ``python main.py serve`` (the model and the collection)::

    python benchmarks/bench_serve.py --config configs/demo.yaml \\
        --ckpt_path runs/demo/lightning_logs/version_0/checkpoints/last.ckpt \\
        --embeddings runs/demo/lightning_logs/version_1/embeddings.safetensors [--queries 100] [--threads N]

Queries are the collection's first ``--queries`` distinct captions (text → clips) and its first
``--queries`` clips (clip → captions, re-embedded from their audio files), ``k = 10``, one at a time,
after ``--warmup`` untimed ones. Rows:

- ``direct``: ``model.encode`` of the query then ``topk_search`` over the collection, timed in
  this process: the baseline, no web stack;
- ``GET /api/search``: the same queries through the FastAPI app and the ASGI test client (routing,
  validation, JSON, the thread pool), timed around the request; ``embed`` and ``search`` are the
  server's own ``timing_ms``.

``ratio`` = median latency / the direct median of the same query kind; ``embed %`` is the share of
the median latency spent embedding the query.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_modules.tools.search import topk_search
from lightning_modules.tools.serve import app_from_args


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=100, help="queries of each kind")
    parser.add_argument("--warmup", type=int, default=5, help="untimed queries first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    options, serve_args = parser.parse_known_args()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    from fastapi.testclient import TestClient

    app, _ = app_from_args(serve_args)
    service = app.state.service
    collection = service.collection
    client = TestClient(app)
    texts = list(dict.fromkeys(collection.captions))[: options.queries]
    clips = collection.clip_ids[: options.queries]
    k = 10

    def direct_text(text: str) -> tuple[float, float]:
        start = time.perf_counter()
        query = service.model.encode(text=[text])
        embedded = time.perf_counter()
        topk_search(query, collection.audio, k)
        return embedded - start, time.perf_counter() - embedded

    def direct_clip(clip: str) -> tuple[float, float]:
        start = time.perf_counter()
        query = service.model.encode(audio=[str(collection.audio_file(clip))], max_seconds=service.max_seconds)
        embedded = time.perf_counter()
        topk_search(query, collection.text, k)
        return embedded - start, time.perf_counter() - embedded

    def api(params: dict) -> tuple[float, float, float]:
        start = time.perf_counter()
        response = client.get("/api/search", params={**params, "k": k})
        total = time.perf_counter() - start
        response.raise_for_status()
        timing = response.json()["timing_ms"]
        return total, timing["embed"] / 1000, timing["search"] / 1000

    rows = []
    for kind, items, direct, param in (("text", texts, direct_text, "q"), ("clip", clips, direct_clip, "clip")):
        for item in items[: options.warmup]:
            direct(item)
            api({param: item})
        measured = {"direct": [], "api": []}
        for item in items:  # interleaved, so that both see the same machine load
            embed, search = direct(item)
            measured["direct"].append((embed + search, embed, search))
            measured["api"].append(api({param: item}))
        base = statistics.median(t for t, _, _ in measured["direct"])
        for name, label in (("direct", "direct (baseline)"), ("api", "GET /api/search")):
            totals = [t for t, _, _ in measured[name]]
            median = statistics.median(totals)
            embed = statistics.median(e for _, e, _ in measured[name])
            search = statistics.median(s for _, _, s in measured[name])
            rows.append((kind, label, len(totals), 1000 * median, 1000 * percentile(totals, 0.95), 1000 * embed,
                         1000 * search, 100 * embed / median, median / base))

    print(f"collection: {collection.path} ({len(collection.clip_ids)} clips, {len(collection.captions)} captions, "
          f"{collection.width}-d); k = {k}; torch threads = {torch.get_num_threads()}")
    print("| query | path | n | median ms | p95 ms | embed ms | search ms | embed % | ratio |")
    print("|-------|------|---|-----------|--------|----------|-----------|---------|-------|")
    for kind, label, n, median, p95, embed, search, share, ratio in rows:
        print(f"| {kind} | {label} | {n} | {median:.1f} | {p95:.1f} | {embed:.1f} | {search:.2f} | {share:.0f} | "
              f"{ratio:.2f} |")


if __name__ == "__main__":
    main()
