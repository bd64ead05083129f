"""Counts the samples dropped as bad (``on_bad_sample: skip``) and the inputs whose texts were cut to
the backbone's ``max_text_tokens``, and reports both at every epoch end."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from datamodules.bad_samples import REASONS, format_counts

#: the data split each stage reads.
_SPLITS = {"train": "train", "validate": "val", "test": "test", "predict": "predict"}
#: the sides of a batch whose truncated inputs the pair collator counts.
_SIDES = ("query", "document")


class SkippedSampleReport(Callback):
    """Sums the skipped samples of each epoch, per reason, and logs and prints them.

    Two sources are added up: the rows and audio headers the data module dropped in ``setup``
    (``datamodule.skipped_counts(split)``, the same on every rank), and the clips that failed to
    decode while loading (each batch's ``batch["skipped"]``, summed over the ranks). Clips that
    ``DistributedSampler`` repeats to even out the ranks' validation or test shares are counted
    each time they fail.

    At the end of every training, validation, test and predict epoch (not the sanity check) the
    callback logs ``data/skipped/<split>/<reason>`` for each reason that occurred and
    ``data/skipped/<split>/total`` (except in predict, where Lightning allows no logging), and rank 0
    prints one line when anything was skipped or the data module's policy is ``skip``.

    Truncated texts are kept, not skipped: each batch's ``batch["truncated"]`` counts the query-side
    and document-side inputs whose text or instruction the collator cut to ``max_text_tokens`` (see
    :mod:`datamodules.text_limits`). They are summed the same way, logged as
    ``data/truncated/<split>/{query,document,total}``, and rank 0 prints a line when any were cut.
    """

    def __init__(self) -> None:
        self._loaded: dict[str, Counter] = {}
        self._truncated: dict[str, Counter] = {}
        #: totals of the last report of each split, ``{split: {reason: count}}``.
        self.last: dict[str, dict[str, int]] = {}
        #: truncated inputs of the last report of each split, ``{split: {side: count}}``.
        self.last_truncated: dict[str, dict[str, int]] = {}

    def _start(self, stage: str) -> None:
        self._loaded[stage] = Counter()
        self._truncated[stage] = Counter()

    def _add(self, stage: str, batch: Any) -> None:
        if isinstance(batch, dict):
            self._loaded.setdefault(stage, Counter()).update(batch.get("skipped", {}))
            self._truncated.setdefault(stage, Counter()).update(batch.get("truncated", {}))

    def _report(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        loaded, truncated = self._loaded.pop(stage, Counter()), self._truncated.pop(stage, Counter())
        counts = [loaded.get(reason, 0) for reason in REASONS] + [truncated.get(side, 0) for side in _SIDES]
        local = torch.tensor(counts, dtype=torch.long, device=pl_module.device)
        summed = trainer.strategy.reduce(local, reduce_op="sum").tolist()
        summed, cut = summed[: len(REASONS)], dict(zip(_SIDES, (int(n) for n in summed[len(REASONS) :])))
        split = _SPLITS[stage]
        self.last_truncated[split] = cut
        datamodule = getattr(trainer, "datamodule", None)
        in_setup = datamodule.skipped_counts(split) if hasattr(datamodule, "skipped_counts") else {}
        while_loading = {reason: int(n) for reason, n in zip(REASONS, summed) if n}
        totals = Counter(in_setup) + Counter(while_loading)
        self.last[split] = dict(totals)
        if stage != "predict":
            for reason, count in totals.items():
                pl_module.log(f"data/skipped/{split}/{reason}", float(count))
            pl_module.log(f"data/skipped/{split}/total", float(sum(totals.values())))
            for side, count in cut.items():
                pl_module.log(f"data/truncated/{split}/{side}", float(count))
            pl_module.log(f"data/truncated/{split}/total", float(sum(cut.values())))
        if trainer.is_global_zero and (totals or getattr(datamodule, "on_bad_sample", None) == "skip"):
            print(
                f"skipped samples ({split}, epoch {trainer.current_epoch}): {format_counts(totals)} "
                f"[{sum(in_setup.values())} in setup, {sum(while_loading.values())} while loading]"
            )
        if trainer.is_global_zero and any(cut.values()):
            print(
                f"truncated texts ({split}, epoch {trainer.current_epoch}): {cut['query']} query-side and "
                f"{cut['document']} document-side inputs cut to the backbone's max_text_tokens"
            )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start("train")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._add("train", batch)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "train")

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start("validate")

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._add("validate", batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, pl_module, "validate")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start("test")

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._add("test", batch)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "test")

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start("predict")

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._add("predict", batch)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "predict")
