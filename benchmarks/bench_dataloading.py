"""Data-loading throughput of the real train loader versus the tiny model's training throughput.

Usage (with the package installed, ``pip install -e .``, or ``PYTHONPATH=.``):
    python benchmarks/bench_dataloading.py [--clips 96] [--batch 8] [--workers 0 2] [--repeats 3] [--shard_count 24]
        [--shuffle_buffers 500 32]

Clips are generated into a temporary folder: 32 kHz 16-bit WAV (so every clip is decoded *and*
resampled to the model's 16 kHz, as with datasets stored above 16 kHz) with durations from the mix of
``bench_padding.py`` (AudioCaps-like 10 s, Clotho-like 15–30 s, short 1–5 s), up to 30 s.

- Loader clips/s: one full epoch of the data module's ``train_dataloader()`` (decoding,
  resampling, random crop, caption draw, tokenisation and Whisper features in the model's collate
  function), timed from ``iter()`` to the last batch. The first epoch (which starts the persistent
  workers) is not timed; the median of ``--repeats`` further epochs is reported.
- Rows "random" use the default loader (:class:`~datamodules.datasets.EpochSampler`), rows
  "bucketed" ``bucket_by_duration=True`` with ``bucket_pool_multiplier=4`` (at the default 32, 96
  clips would make a single pool).
- Source "jsonl" reads one file per clip through the JSONL manifest (``RetrievalDataModule``);
  source "shards" reads the same clips written as WebDataset shards of ``--shard_count`` clips by
  ``python main.py shard`` (``WebDatasetDataModule``; bucketing sorts by the shards' JSON
  durations), once per ``--shuffle_buffers`` size ("shards b500": the default buffer, which here
  holds a worker's whole epoch, so its first batch waits until all its shards are read; "shards
  b32"). "vs jsonl" is a row's loader clips/s over the JSONL loader's with the same batching and
  workers; the loaders of one configuration take turns, epoch by epoch.
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

from datamodules import RetrievalDataModule, WebDatasetDataModule
from datamodules.shard_writer import main as write_shards
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


def clips_per_second(loader, epoch: int) -> float:
    """One timed epoch of a train loader, from ``iter()`` to its last batch."""
    for sampler in (loader.sampler, loader.batch_sampler):  # the epoch lives in one of them
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
    start = time.perf_counter()
    clips = sum(len(batch["query_index"]) for batch in loader)
    return clips / (time.perf_counter() - start)


def loader_clips_per_second(loaders: list, repeats: int) -> list[float]:
    """The median clips/s of each loader over ``repeats`` epochs, after one untimed epoch (which
    starts the persistent workers); the loaders take turns, epoch by epoch, so that a change of the
    machine's load hits them alike."""
    for loader in loaders:
        list(loader)
    rates = [[clips_per_second(loader, epoch) for loader in loaders] for epoch in range(1, repeats + 1)]
    return [statistics.median(column) for column in zip(*rates)]


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
    parser.add_argument("--shard_count", type=int, default=24, help="clips per WebDataset shard")
    parser.add_argument("--shuffle_buffers", type=int, nargs="+", default=[500, 32],
                        help="shuffle buffers of the shard rows (500: the default)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    opts = parser.parse_args(args)
    if opts.threads:
        torch.set_num_threads(opts.threads)

    torch.manual_seed(opts.seed)
    module = tiny_module()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        manifest = write_clips(folder, opts.clips, opts.seed)
        shards = os.path.join(folder, "shards")
        write_shards(["--manifest", manifest, "--output_dir", shards, "--max_count", str(opts.shard_count)])
        with open(os.path.join(shards, "index.json"), encoding="utf-8") as handle:
            pattern = os.path.join(shards, json.load(handle)["pattern"])
        common = dict(batch_size=opts.batch, train_max_seconds=30.0, bucket_pool_multiplier=4, seed=opts.seed)
        sources = ["jsonl"] + [f"shards b{size}" for size in opts.shuffle_buffers]
        for bucketed in (False, True):
            model_rate = None
            for workers in opts.workers:
                loaders = []
                for buffer in [None, *opts.shuffle_buffers]:
                    if buffer is None:
                        dm = RetrievalDataModule(train_manifest=manifest, num_workers=workers, bucket_by_duration=bucketed,
                                                 duration_cache_dir=os.path.join(folder, "cache"), **common)  # fmt: skip
                    else:
                        dm = WebDatasetDataModule(train_shards=pattern, num_workers=workers, bucket_by_duration=bucketed,
                                                  shuffle_buffer=buffer, **common)  # fmt: skip
                    dm.setup("fit")
                    dm.bind(module.backbone.sampling_rate, module.collate)
                    loaders.append(dm.train_dataloader())
                if model_rate is None:
                    model_rate = model_clips_per_second(module, list(loaders[0]))
                rates = loader_clips_per_second(loaders, opts.repeats)
                rows += [(bucketed, source, workers, rate, rate / rates[0], model_rate) for source, rate in zip(sources, rates)]
                del loaders  # stops their persistent workers before the next configuration

    print(f"{opts.clips} clips ({FILE_RATE // 1000} kHz WAV, 1-30 s; shards of {opts.shard_count}), batch {opts.batch}, "
          f"{torch.get_num_threads()} torch threads in the main process")  # fmt: skip
    columns = ["batching", "source", "workers", "loader clips/s", "vs jsonl", "model clips/s", "loader / model"]
    table = [["bucketed" if bucketed else "random", source, str(workers), f"{loader_rate:.1f}", f"{ratio:.2f}",
              f"{model_rate:.1f}", f"{loader_rate / model_rate:.2f}"]
             for bucketed, source, workers, loader_rate, ratio, model_rate in rows]  # fmt: skip
    widths = [max(len(cell) for cell in column) for column in zip(columns, *table)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for cells in table:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |")


if __name__ == "__main__":
    main()
