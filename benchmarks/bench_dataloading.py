"""Data-loading throughput of the real train loader versus the tiny model's training throughput.

Usage (with the package installed, ``pip install -e .``, or ``PYTHONPATH=.``):
    python benchmarks/bench_dataloading.py [--clips 96] [--batch 8] [--workers 0 2] [--repeats 3]

Clips are generated into a temporary folder: 32 kHz 16-bit WAV (so every clip is decoded *and*
resampled to the model's 16 kHz, as with datasets stored above 16 kHz) with durations from the mix of
``bench_padding.py`` (AudioCaps-like 10 s, Clotho-like 15–30 s, short 1–5 s), up to 30 s.

- Loader clips/s: one full epoch of ``RetrievalDataModule.train_dataloader()`` (decoding,
  resampling, random crop, caption draw, tokenisation and Whisper features in the model's collate
  function), timed from ``iter()`` to the last batch. The first epoch (which starts the persistent
  workers) is not timed; the median of ``--repeats`` further epochs is reported.
- Rows "random" use the default loader (:class:`~datamodules.datasets.EpochSampler`), rows
  "bucketed" ``bucket_by_duration=True`` with ``bucket_pool_multiplier=4`` (at the default 32, 96
  clips would make a single pool).
- Model clips/s: training steps (both sides embedded, InfoNCE, backward, AdamW step) of the
  ``EmbeddingModule`` with the tiny random Qwen2.5-Omni thinker on the same epoch's batches, collated
  beforehand and held in memory; the first two steps are not timed.

The loader keeps up when its clips/s is at least the model's. On a machine this small the workers
and the model share the same cores, so the two columns cannot simply be added up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import soundfile as sf
import torch
from bench_padding import duration_mix

from datamodules import RetrievalDataModule
from lightning_modules import EmbeddingModule, EmbTokenPooler, IdentityHead, PromptTemplates, QwenOmniThinker
from losses import InfoNCE

FILE_RATE = 32_000


def write_clips(folder: str, count: int, seed: int) -> str:
    """Noisy tone clips with one caption each; returns the manifest path."""
    rng = np.random.default_rng(seed)
    durations = duration_mix(count, seed)
    os.makedirs(os.path.join(folder, "audio"), exist_ok=True)
    manifest = os.path.join(folder, "train.jsonl")
    with open(manifest, "w", encoding="utf-8") as handle:
        for i, seconds in enumerate(durations):
            t = np.arange(round(seconds * FILE_RATE)) / FILE_RATE
            wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(len(t))
            audio = f"audio/{i:05d}.wav"
            sf.write(os.path.join(folder, audio), wave.astype(np.float32), FILE_RATE, subtype="PCM_16")
            row = {"id": f"{i:05d}", "audio": audio, "caption": [f"a tone of clip {i}", f"clip number {i} hums"]}
            handle.write(json.dumps(row) + "\n")
    return manifest


def tiny_module() -> EmbeddingModule:
    backbone = QwenOmniThinker(tiny=True, prompts=PromptTemplates(system=None))
    return EmbeddingModule(backbone, EmbTokenPooler(), IdentityHead(), InfoNCE(temperature=0.05), learning_rate=1e-3)


def loader_clips_per_second(loader, repeats: int) -> float:
    list(loader)  # starts persistent workers; not timed
    rates = []
    for epoch in range(1, repeats + 1):
        for sampler in (loader.sampler, loader.batch_sampler):  # the epoch lives in one of them
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
        start = time.perf_counter()
        clips = sum(len(batch["query_index"]) for batch in loader)
        rates.append(clips / (time.perf_counter() - start))
    return statistics.median(rates)


def model_clips_per_second(module: EmbeddingModule, batches: list[dict], warmup: int = 2) -> float:
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module.train()
    clips, elapsed = 0, 0.0
    for step, batch in enumerate(batches):
        start = time.perf_counter()
        query, document = module.embed_batch(batch)
        module.loss(query, document, batch["info"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= warmup:
            elapsed += time.perf_counter() - start
            clips += len(batch["query_index"])
    return clips / elapsed


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    opts = parser.parse_args(args)
    if opts.threads:
        torch.set_num_threads(opts.threads)

    torch.manual_seed(opts.seed)
    module = tiny_module()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        manifest = write_clips(folder, opts.clips, opts.seed)
        for bucketed in (False, True):
            model_rate = None
            for workers in opts.workers:
                dm = RetrievalDataModule(train_manifest=manifest, batch_size=opts.batch, num_workers=workers,
                                         train_max_seconds=30.0, bucket_by_duration=bucketed, bucket_pool_multiplier=4,
                                         duration_cache_dir=os.path.join(folder, "cache"), seed=opts.seed)  # fmt: skip
                dm.bind(module.backbone.sampling_rate, module.collate)
                loader = dm.train_dataloader()
                if model_rate is None:
                    model_rate = model_clips_per_second(module, list(loader))
                rows.append((bucketed, workers, loader_clips_per_second(loader, opts.repeats), model_rate))
                del loader  # stops its persistent workers before the next configuration

    print(f"{opts.clips} clips ({FILE_RATE // 1000} kHz WAV, 1-30 s), batch {opts.batch}, "
          f"{torch.get_num_threads()} torch threads in the main process")  # fmt: skip
    columns = ["batching", "workers", "loader clips/s", "model clips/s", "loader / model"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("-" * (len(c) + 2) for c in columns) + "|")
    for bucketed, workers, loader_rate, model_rate in rows:
        cells = ["bucketed" if bucketed else "random", str(workers), f"{loader_rate:.1f}", f"{model_rate:.1f}",
                 f"{loader_rate / model_rate:.2f}"]  # fmt: skip
        print("| " + " | ".join(c.rjust(len(h)) for c, h in zip(cells, columns)) + " |")


if __name__ == "__main__":
    main()
