"""Training-step throughput of the EmbeddingModule under Lightning's Trainer versus a plain PyTorch loop.

Usage (with the package installed, ``pip install -e .``, or ``PYTHONPATH=.``):
    python benchmarks/bench_trainer_overhead.py [--batch 32] [--steps 20] [--warmup 3] [--repeats 5]

Both sides train the same tiny random Qwen2.5-Omni thinker ``EmbeddingModule`` (a fresh copy of the
same initial weights each run) on the same batches of the synthetic demo data (1–3 s clips),
collated once and held in memory, served by the same ``DataLoader`` (no workers, no collation), with
the same AdamW parameter groups and the same warm-up + cosine schedule, for the same number of steps,
in the same process. The first ``--warmup`` steps are not timed; the timed window runs from the end
of the last warm-up step to the end of the last step (batch fetch, forward, backward, optimiser and
scheduler steps). Runs alternate between the two sides; the table reports medians over repeats.

Disabled in the Trainer: logger (``logger=False``), checkpointing, progress bar, model summary and
validation (no val loader, no sanity check). Still on, as part of what is measured: the Trainer's
loops and hooks, ``batch_to_device``, and the module's ``self.log`` calls (the plain loop calls the
module's ``embed_batch`` and ``loss`` directly and logs nothing). A third row runs the Trainer
with the module's ``self.log``/``self.log_dict`` turned into no-ops, to show what the logging costs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import lightning.pytorch as pl
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from datamodules import RetrievalDataModule, make_synthetic_dataset
from lightning_modules import EmbeddingModule, EmbTokenPooler, IdentityHead, PromptTemplates, QwenOmniThinker
from lightning_modules.finetune import warmup_cosine
from losses import InfoNCE


def _identity(item):
    return item


class _WindowTimer(pl.Callback):
    """Wall time from the end of step ``warmup`` - 1 to the end of the last step."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = self.end = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if batch_idx == self.warmup - 1:
            self.start = now
        self.end = now


def make_module(learning_rate: float, warmup_steps: int) -> EmbeddingModule:
    return EmbeddingModule(
        QwenOmniThinker(tiny=True, prompts=PromptTemplates(system=None)),
        EmbTokenPooler(),
        IdentityHead(),
        InfoNCE(temperature=0.05),
        learning_rate=learning_rate,
        weight_decay=0.01,
        warmup_steps=warmup_steps,
        min_lr_ratio=0.05,
    )


def make_loader(batches: list[dict], steps: int) -> DataLoader:
    # batch_size=None: the items already are collated batches.
    return DataLoader([batches[i % len(batches)] for i in range(steps)], batch_size=None, collate_fn=_identity)


def run_trainer(module: EmbeddingModule, batches: list[dict], total: int, warmup: int) -> float:
    timer = _WindowTimer(warmup)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=total,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=make_loader(batches, total))
    return timer.end - timer.start


def _no_log(*args, **kwargs) -> None:
    return None


def run_trainer_without_logging(module: EmbeddingModule, batches: list[dict], total: int, warmup: int) -> float:
    """The Trainer with the module's ``self.log`` / ``self.log_dict`` calls made no-ops."""
    module.log = module.log_dict = _no_log
    return run_trainer(module, batches, total, warmup)


def run_plain(module: EmbeddingModule, batches: list[dict], total: int, warmup: int) -> float:
    """The same step written by hand: AdamW groups and schedule as in ``configure_optimizers``."""
    hp = module.hparams
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=hp.learning_rate,
        betas=tuple(hp.betas),
    )
    scheduler = LambdaLR(optimizer, warmup_cosine(hp.warmup_steps, total, hp.min_lr_ratio))
    module.train()
    start = 0.0
    for step, batch in enumerate(make_loader(batches, total)):
        query, document = module.embed_batch(batch)
        module.loss(query, document, batch["info"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        if step == warmup - 1:
            start = time.perf_counter()
    return time.perf_counter() - start


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--distinct-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    opts = parser.parse_args(args)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.warmup < 1:
        parser.error("--warmup must be >= 1 (the timed window starts at the end of a warm-up step)")

    torch.manual_seed(0)
    base = make_module(learning_rate=1e-3, warmup_steps=5)
    with tempfile.TemporaryDirectory() as folder:
        manifests = make_synthetic_dataset(folder, seed=0, num_train=opts.batch * opts.distinct_batches,
                                           num_val=0, num_test=0)  # fmt: skip
        dm = RetrievalDataModule(train_manifest=manifests["train"], batch_size=opts.batch)
        dm.bind(base.backbone.sampling_rate, base.collate)
        batches = list(dm.train_dataloader())
    total = opts.warmup + opts.steps
    runs = {
        "Lightning Trainer": run_trainer,
        "Lightning Trainer, module logging off": run_trainer_without_logging,
        "plain PyTorch loop": run_plain,
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(opts.repeats):
        # Rotate which side goes first, so slow drifts of the machine hit all alike.
        names = list(runs)[repeat % len(runs) :] + list(runs)[: repeat % len(runs)]
        for name in names:
            times[name].append(runs[name](copy.deepcopy(base), batches, total, opts.warmup))

    plain = statistics.median(times["plain PyTorch loop"])
    print(f"batch {opts.batch}, {opts.steps} timed steps after {opts.warmup} warm-up steps, {opts.repeats} repeats, "
          f"{torch.get_num_threads()} torch threads")  # fmt: skip
    columns = ["loop", "median ms/step", "min ms/step", "max ms/step", "clips/s", "throughput vs plain"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("-" * (len(c) + 2) for c in columns) + "|")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        cells = [name, f"{1000 * median / opts.steps:.1f}", f"{1000 * min(seconds) / opts.steps:.1f}",
                 f"{1000 * max(seconds) / opts.steps:.1f}", f"{opts.batch * opts.steps / median:.1f}",
                 f"{plain / median:.3f}"]  # fmt: skip
        print("| " + " | ".join([cells[0]] + [c.rjust(len(h)) for c, h in zip(cells[1:], columns[1:])]) + " |")


if __name__ == "__main__":
    main()
