"""Speed and memory of the streaming retrieval-metric engine (``lightning_modules.metrics``).

Usage (with the package installed, ``pip install -e .``, or ``PYTHONPATH=.``):
    python benchmarks/bench_retrieval_metrics.py [--part a|b|both] [--audios 2500] [--captions 12500]
        [--queries 100000] [--candidates 500000] [--dim 64] [--block-size 16384] [--threads N]

(a) ``retrieval_metrics`` against torchmetrics on an AudioCaps/Clotho-shaped set (5 captions per
    audio by default, D = 512, random unit vectors, captions = their audio plus noise, seed 0). The
    default size is half the 5,000 x 25,000 of the task in each direction because torchmetrics peaked
    at 12.6 GB resident on the full size (the flattened pairs are stored as float32 preds, int64
    target and int64 indexes, then concatenated and sorted); ``--audios 5000`` runs it. torchmetrics
    needs the score matrix flattened into ``(preds, target, indexes)`` triples, which are fed in
    chunks of queries; its four metrics per direction share one copy of the triples through a
    ``MetricCollection`` compute group. Its time includes scoring the pairs, as ours does.
    Definitions compared (all in percent):

    - T2A (one relevant audio per caption): ``RetrievalRecall(top_k=k)`` is our R@k and
      ``RetrievalMAP(top_k=10)`` is our mAP@10 (both the reciprocal rank truncated at 10).
    - A2T (5 relevant captions): torchmetrics' recall@k is the *fraction* of relevant captions in the
      top k, not our "any relevant caption in the top k", which is ``RetrievalHitRate(top_k=k)``; and
      its AP@10 divides by the number of relevant captions found in the top 10, while ours divides by
      all relevant captions (5). So A2T R@k is compared with ``RetrievalHitRate``, and A2T mAP@10 is
      not compared (printed as "n/a", different definition).

    torchmetrics also treats a relevant item with a score <= 0 as irrelevant; the data are built so
    that every relevant pair scores > 0 (checked), which makes that rule a no-op here.

(b) The streaming engine alone on a T2A layout too large for one score matrix: ``--queries``
    captions, each relevant to one of ``--candidates`` audios, sorted by audio as
    ``retrieval_metrics`` sorts them. It runs the same internal path as the T2A half of
    ``retrieval_metrics`` (``_relevant_ranks`` then ``_summarise``); the public function cannot be
    used because it requires a caption for every audio. Reports time, the peak resident set
    (``ru_maxrss``) and the size of the full float32 score matrix that was never built.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP, RetrievalRecall

from lightning_modules import metrics
from lightning_modules.metrics import retrieval_metrics

NOISE = 0.2
"""Per-dimension noise added to an audio embedding to make its captions: relevant cosines come out
around 0.2, so ranking is neither trivial nor hopeless and no relevant pair scores <= 0."""


def paired_set(num_audio: int, num_text: int, dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Audios and captions spread evenly over them, grouped by audio (5 each for 5x as many)."""
    if num_text < num_audio:
        raise ValueError(f"every audio needs a caption: {num_text} captions for {num_audio} audios")
    g = torch.Generator().manual_seed(seed)
    audio = F.normalize(torch.randn(num_audio, dim, generator=g), dim=-1)
    audio_ids = torch.arange(num_audio)
    text_ids = torch.arange(num_text) * num_audio // num_text
    text = F.normalize(audio[text_ids] + NOISE * torch.randn(text_ids.numel(), dim, generator=g), dim=-1)
    text_keys = torch.arange(text_ids.numel())
    return audio, audio_ids, text, text_ids, text_keys


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def torchmetrics_direction(queries, candidates, relevant, top_ks, hit_rate: bool, chunk: int) -> dict[str, float]:
    """torchmetrics values of one direction; ``relevant(begin, end)`` is the (rows, N) relevance mask."""
    recall = RetrievalHitRate if hit_rate else RetrievalRecall
    collection = MetricCollection(
        {**{f"R@{k}": recall(top_k=k) for k in top_ks}, "mAP@10": RetrievalMAP(top_k=10)}, compute_groups=True
    )
    for begin in range(0, queries.shape[0], chunk):
        scores = queries[begin : begin + chunk] @ candidates.T
        target = relevant(begin, begin + chunk)
        if not (scores[target] > 0).all():
            raise RuntimeError("a relevant pair scores <= 0: torchmetrics would drop it, raise the signal")
        indexes = torch.arange(begin, begin + scores.shape[0]).unsqueeze(1).expand_as(scores)
        collection.update(scores.flatten(), target.flatten(), indexes=indexes.flatten())
    values = {name: value.item() * 100 for name, value in collection.compute().items()}
    del collection
    return values


def part_a(opts: argparse.Namespace) -> None:
    num_text = opts.captions if opts.captions is not None else 5 * opts.audios
    audio, audio_ids, text, text_ids, text_keys = paired_set(opts.audios, num_text, 512, 0)
    print(f"(a) {opts.audios:,} audios x {text_ids.numel():,} captions, D = 512, float32, "
          f"{torch.get_num_threads()} CPU threads")

    ours_times = []
    for _ in range(opts.repeats):
        start = time.perf_counter()
        ours = retrieval_metrics(audio, audio_ids, text, text_ids, text_keys)
        ours_times.append(time.perf_counter() - start)
    ours_seconds = statistics.median(ours_times)
    rss_ours = peak_rss_mb()

    start = time.perf_counter()
    t2a = torchmetrics_direction(
        text, audio, lambda b, e: text_ids[b:e, None] == audio_ids[None, :], (1, 5, 10), False, opts.tm_chunk
    )
    a2t = torchmetrics_direction(
        audio, text, lambda b, e: audio_ids[b:e, None] == text_ids[None, :], (1, 5, 10), True, opts.tm_chunk
    )
    tm_seconds = time.perf_counter() - start
    rss_all = peak_rss_mb()

    reference = {f"t2a/{k}": v for k, v in t2a.items()}
    reference.update({f"a2t/{k}": v for k, v in a2t.items() if k != "mAP@10"})  # different definition
    diffs = {key: abs(ours[key].item() - value) for key, value in reference.items()}
    print("our values: " + ", ".join(f"{k} {ours[k].item():.3f}" for k in ours if "@" in k))
    print(f"torchmetrics A2T AP@10 (its definition, not compared): {a2t['mAP@10']:.3f}")
    print()
    columns = ["t2a/R@1", "t2a/R@5", "t2a/R@10", "t2a/mAP@10", "a2t/R@1", "a2t/R@5", "a2t/R@10", "a2t/mAP@10"]
    print("| method | seconds | × torchmetrics time | " + " | ".join(f"abs. diff {c}" for c in columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    diff_cells = " | ".join(f"{diffs[c]:.1e}" if c in diffs else "n/a" for c in columns)
    print(f"| retrieval_metrics | {ours_seconds:.2f} | {ours_seconds / tm_seconds:.3f} | {diff_cells} |")
    dashes = " | ".join("-" for _ in columns)
    print(f"| torchmetrics (Recall/HitRate + MAP) | {tm_seconds:.2f} | 1.000 | {dashes} |")
    print()
    print(f"speed-up: {tm_seconds / ours_seconds:.1f}x (goal >= 20x); ours median of {opts.repeats} runs "
          f"{[round(t, 2) for t in ours_times]}; peak RSS after ours {rss_ours:,.0f} MB, after torchmetrics "
          f"{rss_all:,.0f} MB")
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= 1e-4, f"{worst} differs from torchmetrics by {diffs[worst]}"


def part_b(opts: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(1)
    audio = F.normalize(torch.randn(opts.candidates, opts.dim, generator=g), dim=-1)
    # Each caption describes a distinct audio; sorted, as retrieval_metrics sorts captions by clip id.
    target = torch.randperm(opts.candidates, generator=g)[: opts.queries].sort().values
    text = F.normalize(audio[target] + NOISE * torch.randn(opts.queries, opts.dim, generator=g), dim=-1)
    relevant = torch.ones(opts.queries, 1, dtype=torch.bool)
    print(f"(b) T2A layout: {opts.queries:,} queries x {opts.candidates:,} candidates, D = {opts.dim}, "
          f"chunk_size {opts.chunk_size}, block_size {opts.block_size}, {torch.get_num_threads()} CPU threads")

    rss_before = peak_rss_mb()
    start = time.perf_counter()
    ranks = metrics._relevant_ranks(
        text, audio, target.unsqueeze(1), relevant, None, opts.chunk_size, opts.block_size
    )
    summary = metrics._summarise(ranks, torch.ones(opts.queries, dtype=torch.long))
    seconds = time.perf_counter() - start
    rss_after = peak_rss_mb()

    full_matrix_gb = opts.queries * opts.candidates * 4 / 1e9
    block_mb = opts.chunk_size * opts.block_size * 4 / 1e6
    print("values: " + ", ".join(f"{k} {v.item():.3f}" for k, v in summary.items()))
    print()
    print("| queries | candidates | D | chunk × block | seconds | ns / score | peak RSS before (MB) | "
          "peak RSS after (MB) | one score block (MB) | full score matrix avoided (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {opts.queries:,} | {opts.candidates:,} | {opts.dim} | {opts.chunk_size} × {opts.block_size} | "
          f"{seconds:.1f} | {seconds / (opts.queries * opts.candidates) * 1e9:.2f} | {rss_before:,.0f} | "
          f"{rss_after:,.0f} | {block_mb:.0f} | {full_matrix_gb:,.1f} |")


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("a", "b", "both"), default="both")
    parser.add_argument("--audios", type=int, default=2500, help="(a) number of audios")
    parser.add_argument("--captions", type=int, default=None, help="(a) number of captions (default 5 per audio)")
    parser.add_argument("--repeats", type=int, default=3, help="(a) timed runs of ours (median reported)")
    parser.add_argument("--tm-chunk", type=int, default=1000, help="(a) queries per torchmetrics update")
    parser.add_argument("--queries", type=int, default=100_000, help="(b) number of text queries")
    parser.add_argument("--candidates", type=int, default=500_000, help="(b) number of audio candidates")
    parser.add_argument("--dim", type=int, default=64, help="(b) embedding dimension")
    parser.add_argument("--chunk-size", type=int, default=1024, help="(b) queries per chunk")
    parser.add_argument("--block-size", type=int, default=16384, help="(b) candidates per block")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    opts = parser.parse_args(args)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.part in ("a", "both"):
        part_a(opts)
    if opts.part in ("b", "both"):
        part_b(opts)


if __name__ == "__main__":
    main()
