"""Progress as plain text lines, for runs whose output goes to a log file rather than a terminal."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Literal

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

__all__ = ["LineProgress"]

ProgressStyle = Literal["auto", "lines", "bar"]


def _clock(seconds: float) -> str:
    """``h:mm:ss`` (``?`` when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _count(done: int, total: float) -> str:
    """``done/total``, or ``done`` alone when the total is unknown (an iterable dataset)."""
    return f"{done}/{int(total)}" if math.isfinite(total) else str(done)


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class LineProgress(ProgressBar):
    """Prints one complete line every ``every_n_batches`` batches instead of redrawing a bar.

    A progress bar redraws a terminal line in place. Sent to a file (a SLURM job's log, ``fit ... >
    run.log``), Lightning's rich bar shows nothing until the run ends and tqdm's fills the file with
    carriage-return fragments. This bar writes ordinary lines to stdout, readable with ``tail -f``::

        epoch 3/30 batch 10/13 | step 36/390 | train/loss 2.113 | 2.61 it/s | elapsed 0:00:14 | ETA 0:02:18
        validation: 2 batches in 0:00:01 | val/t2a/R@1 12.5

    Training lines carry the epoch and batch, the optimiser step out of the run's total, the
    metrics logged with ``prog_bar=True`` (the loss), the batches per second since the previous
    line, the time since training started and the estimated time left (remaining optimiser steps at
    the mean rate so far, validation included). Validation, test and predict print a line every
    ``every_n_batches`` batches of each loader and one when they finish (validation with the
    checkpoint's monitored metric). Only the first process prints; the sanity check prints nothing.

    The command line (``main.py``) uses this bar instead of Lightning's default when stdout is not a
    terminal (``--progress.style auto``), and never when ``--trainer.enable_progress_bar false``.

    Args:
        every_n_batches: print a line every this many batches (training and evaluation alike).
        style: how the command line chooses the bar: ``auto`` (these lines when stdout is not a
            terminal, Lightning's bar when it is), ``lines`` (always these lines) or ``bar`` (always
            Lightning's bar). A trainer given this callback directly always prints lines.
    """

    def __init__(self, every_n_batches: int = 50, style: ProgressStyle = "auto"):
        super().__init__()
        if every_n_batches < 1:
            raise ValueError(f"every_n_batches must be >= 1, got {every_n_batches}")
        if style not in ("auto", "lines", "bar"):
            raise ValueError(f"style must be 'auto', 'lines' or 'bar', got {style!r}")
        self.every_n_batches = every_n_batches
        self.style = style
        self._enabled = True
        self._train_start = 0.0
        self._interval_start = 0.0
        self._interval_batches = 0
        self._eval_start = 0.0
        self._eval_batches = 0

    def replaces_default_bar(self, trainer_config: dict[str, Any], stream: Any = None) -> bool:
        """Whether a trainer built from ``trainer_config`` should get this bar instead of Lightning's.

        ``stream`` is the output to judge (default: ``sys.stdout``). Not when the progress bar is
        disabled, nor when the config's callbacks already hold a progress bar.
        """
        if self.style == "bar" or trainer_config.get("enable_progress_bar") is False:
            return False
        if any(isinstance(c, ProgressBar) for c in _as_list(trainer_config.get("callbacks"))):
            return False
        stream = sys.stdout if stream is None else stream
        return self.style == "lines" or not (hasattr(stream, "isatty") and stream.isatty())

    def with_trainer_callbacks(self, trainer_config: dict[str, Any]) -> list[Callback]:
        """The config's callbacks followed by this bar."""
        return [*_as_list(trainer_config.get("callbacks")), self]

    # -- ProgressBar interface

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, line: str) -> None:
        if self._enabled:
            print(line, file=sys.stdout, flush=True)

    def _metrics(self, trainer: Trainer, pl_module: LightningModule) -> str:
        items = self.get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return "".join(f" | {key} {_value(value)}" for key, value in items.items())

    # -- training

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._train_start = self._interval_start = time.perf_counter()
        self._interval_batches = 0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._interval_start = time.perf_counter()
        self._interval_batches = 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._interval_batches += 1
        done = batch_idx + 1
        if done % self.every_n_batches and done != self.total_train_batches:
            return
        now = time.perf_counter()
        rate = self._interval_batches / max(now - self._interval_start, 1e-9)
        elapsed = now - self._train_start
        steps, total_steps = trainer.global_step, float(trainer.estimated_stepping_batches)
        left = (total_steps - steps) * elapsed / steps if steps and math.isfinite(total_steps) else math.inf
        epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else math.inf
        self._print(
            f"epoch {_count(trainer.current_epoch + 1, epochs)} batch {_count(done, self.total_train_batches)}"
            f" | step {_count(steps, total_steps)}{self._metrics(trainer, pl_module)}"
            f" | {rate:.2f} it/s | elapsed {_clock(elapsed)} | ETA {_clock(left)}"
        )
        self._interval_start, self._interval_batches = now, 0

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._print(
            f"training: {trainer.global_step} steps in {_clock(time.perf_counter() - self._train_start)}"
            f"{self._metrics(trainer, pl_module)}"
        )

    # -- evaluation

    def _eval_start_(self, trainer: Trainer) -> None:
        self.reset_dataloader_idx_tracker()
        self._eval_start = time.perf_counter()
        self._eval_batches = 0

    def _eval_batch(self, trainer: Trainer, what: str, batch_idx: int, dataloader_idx: int, total: float) -> None:
        self._eval_batches += 1
        if trainer.sanity_checking or (batch_idx + 1) % self.every_n_batches:
            return
        loader = f" loader {dataloader_idx + 1}" if self._eval_loaders(trainer, what) > 1 else ""
        elapsed = time.perf_counter() - self._eval_start
        self._print(f"{what}{loader}: batch {_count(batch_idx + 1, total)} | elapsed {_clock(elapsed)}")

    @staticmethod
    def _eval_loaders(trainer: Trainer, what: str) -> int:
        batches = {"validation": trainer.num_val_batches, "test": trainer.num_test_batches}.get(
            what, trainer.num_predict_batches
        )
        return len(batches) if isinstance(batches, list) else 1

    def _eval_end(self, trainer: Trainer, what: str, extra: str = "") -> None:
        if trainer.sanity_checking:
            return
        elapsed = _clock(time.perf_counter() - self._eval_start)
        batches = f"{self._eval_batches} batch{'es' if self._eval_batches != 1 else ''}"
        self._print(f"{what}: {batches} in {elapsed}{extra}")

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start_(trainer)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self.has_dataloader_changed(dataloader_idx)  # points total_val_batches_current_dataloader at it
        self._eval_batch(trainer, "validation", batch_idx, dataloader_idx, self.total_val_batches_current_dataloader)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        monitor = getattr(trainer.checkpoint_callback, "monitor", None)
        value = trainer.callback_metrics.get(monitor) if monitor else None
        self._eval_end(trainer, "validation", f" | {monitor} {float(value):.4g}" if value is not None else "")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start_(trainer)

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self.has_dataloader_changed(dataloader_idx)  # points total_test_batches_current_dataloader at it
        self._eval_batch(trainer, "test", batch_idx, dataloader_idx, self.total_test_batches_current_dataloader)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_end(trainer, "test")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start_(trainer)

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self.has_dataloader_changed(dataloader_idx)  # points total_predict_batches_current_dataloader at it
        self._eval_batch(trainer, "predict", batch_idx, dataloader_idx, self.total_predict_batches_current_dataloader)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_end(trainer, "predict")


def _as_list(callbacks: Any) -> list[Callback]:
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
