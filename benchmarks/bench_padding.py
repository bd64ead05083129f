"""Padded audio frames with duration-bucketed versus random batches on a realistic duration mix.

Usage (with the package installed, ``pip install -e .``, or ``PYTHONPATH=.``):
    python benchmarks/bench_padding.py [--clips 20000] [--batch-sizes 8 32 64] [--pool-multipliers 1 4 32]

Every batch is padded to its longest clip, so it costs ``batch size x longest clip`` frames (10 ms
Whisper frames, 100 per second). The duration mix imitates a pre-training blend:

- 50 % AudioCaps-like: 90 % exactly 10 s, 10 % uniform 2–10 s (trimmed YouTube clips);
- 30 % Clotho-like: uniform 15–30 s;
- 20 % short event clips: uniform 1–5 s.

Clips are cropped to 30 s (the feature extractor's window). "Random" batches are consecutive slices
of the :class:`~datamodules.datasets.EpochSampler` permutation (the default train loader); "bucketed"
are :class:`~datamodules.bucketing.DurationBatchSampler` batches for the same seed and epoch (it
starts from the same permutation, so with pool 1 it only reorders clips within the random batches). Both keep only full
batches. "Padding ratio" is padding frames / those of random batches (goal: <= 0.5); "compute ratio"
is frames computed (real + padding) / those of random batches. ``pool`` is the pool multiplier: a
clip is sorted among ``batch x pool`` clips.
"""

from __future__ import annotations

import argparse

import numpy as np

from datamodules.bucketing import DurationBatchSampler
from datamodules.datasets import EpochSampler

FRAMES_PER_SECOND = 100  # Whisper hop of 10 ms


def duration_mix(n: int, seed: int = 0, max_seconds: float = 30.0) -> np.ndarray:
    """Clip durations in seconds, drawn from the mix in the module docstring."""
    rng = np.random.default_rng(seed)
    source = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    audiocaps = np.where(rng.random(n) < 0.9, 10.0, rng.uniform(2, 10, n))
    clotho = rng.uniform(15, 30, n)
    short = rng.uniform(1, 5, n)
    return np.minimum(np.choose(source, [audiocaps, clotho, short]), max_seconds)


def frames(durations: np.ndarray, batches: list[np.ndarray]) -> tuple[int, int]:
    """(frames computed with padding, real frames) over ``batches``."""
    lengths = np.ceil(durations * FRAMES_PER_SECOND).astype(np.int64)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    real = sum(int(lengths[b].sum()) for b in batches)
    return padded, real


def random_batches(n: int, batch_size: int, seed: int) -> list[np.ndarray]:
    order = np.array([index for _, index in EpochSampler(n, shuffle=True, seed=seed)])
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def bucketed_batches(durations: np.ndarray, batch_size: int, pool_multiplier: int, seed: int) -> list[np.ndarray]:
    sampler = DurationBatchSampler(durations, batch_size, pool_multiplier=pool_multiplier, seed=seed)
    return [np.array([i for _, i in batch]) for batch in sampler]


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=20_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--pool-multipliers", type=int, nargs="+", default=[1, 4, 32])
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(args)

    durations = duration_mix(opts.clips, opts.seed)
    print(f"{opts.clips} clips, mean {durations.mean():.1f} s, median {np.median(durations):.1f} s, "
          f"total {durations.sum() / 3600:.1f} h")  # fmt: skip
    columns = ["batch", "batching", "pool", "frames computed", "real frames", "padding frames", "padding %",
               "padding ratio", "compute ratio"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("-" * (len(c) + 2) for c in columns) + "|")
    for batch_size in opts.batch_sizes:
        rows = [("random", "-", frames(durations, random_batches(len(durations), batch_size, opts.seed)))]
        for pool in opts.pool_multipliers:
            batches = bucketed_batches(durations, batch_size, pool, opts.seed)
            rows.append(("bucketed", str(pool), frames(durations, batches)))
        random_padded, random_real = rows[0][2]
        for name, pool, (padded, real) in rows:
            padding = padded - real
            cells = [str(batch_size), name, pool, f"{padded:,}", f"{real:,}", f"{padding:,}",
                     f"{100 * padding / padded:.1f}", f"{padding / (random_padded - random_real):.3f}",
                     f"{padded / random_padded:.3f}"]  # fmt: skip
            print("| " + " | ".join(c.rjust(len(h)) for c, h in zip(cells, columns)) + " |")


if __name__ == "__main__":
    main()
