"""Forward + backward time of each loss relative to plain InfoNCE (CPU, float32).

Usage (with the package installed, ``pip install -e .``, or ``PYTHONPATH=.``):
    python benchmarks/bench_losses.py [--batch 1024] [--dim 1024] [--repeats 9]

The embeddings are fixed random unit vectors; timings include building the structure tensors from
the Python lists (hashing texts and tag sets), since that runs on every training step too.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

from losses import BatchInfo, HybridNCE, InfoNCE, MarginMasker, Matryoshka


def losses_to_compare(dim: int) -> dict[str, torch.nn.Module]:
    return {
        "InfoNCE": InfoNCE(),
        "InfoNCE multi": InfoNCE(positives="multi"),
        "InfoNCE mask": InfoNCE(positives="mask"),
        "HybridNCE": HybridNCE(alpha=0.5, beta=0.1, lam=1.0),
        "InfoNCE + MarginMasker": InfoNCE(masker=MarginMasker(0.1)),
        "Matryoshka(InfoNCE)": Matryoshka(InfoNCE(), sorted({d for d in (dim, 512, 256, 128, 64) if d <= dim}, reverse=True)),
    }


def structure(batch: int) -> BatchInfo:
    rng = random.Random(0)
    # Two captions per clip; a quarter of the rows sampled tags drawn from 50 clusters.
    kinds = [rng.choice(["long", "short", "caption", "tags"]) for _ in range(batch)]
    return BatchInfo(
        clip_index=torch.arange(batch) // 2,
        texts=[f"caption {rng.randrange(batch)}" for _ in range(batch)],
        tag_clusters=[frozenset(rng.sample(range(50), 2)) if k == "tags" else frozenset() for k in kinds],
        caption_kinds=kinds,
    )


def time_once(loss: torch.nn.Module, q: torch.Tensor, d: torch.Tensor, info: BatchInfo) -> float:
    q, d = q.detach().requires_grad_(), d.detach().requires_grad_()
    start = time.perf_counter()
    loss(q, d, info).loss.backward()
    return time.perf_counter() - start


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    opts = parser.parse_args(args)
    if opts.threads:
        torch.set_num_threads(opts.threads)

    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(opts.batch, opts.dim, generator=g), dim=-1)
    d = F.normalize(q + torch.randn(opts.batch, opts.dim, generator=g), dim=-1)
    info = structure(opts.batch)

    print(f"B = {opts.batch}, D = {opts.dim}, float32, {torch.get_num_threads()} CPU threads, "
          f"median of {opts.repeats}, forward + backward")
    losses = losses_to_compare(opts.dim)
    samples = {name: [] for name in losses}
    # Round-robin over the losses, so that a change in machine load affects all of them alike;
    # the first two rounds warm up the allocator and kernels.
    for round_ in range(opts.repeats + 2):
        for name, loss in losses.items():
            seconds = time_once(loss, q, d, info)
            if round_ >= 2:
                samples[name].append(seconds)
    timings = {name: statistics.median(values) for name, values in samples.items()}
    base = timings["InfoNCE"]
    print(f"| {'loss':<24} | {'ms':>8} | {'× InfoNCE':>9} |")
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 11}|")
    for name, seconds in timings.items():
        print(f"| {name:<24} | {seconds * 1e3:>8.1f} | {seconds / base:>9.2f} |")


if __name__ == "__main__":
    main()
