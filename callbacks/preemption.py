"""A checkpoint on preemption (SIGTERM, SLURM's SIGUSR1), then a clean exit."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class PreemptionCheckpoint(Callback):
    """On one of ``signals``, saves ``<dirpath>/<filename>.ckpt`` at the end of the running training
    step and stops the fit with exit status 0; ``--ckpt_path`` that file resumes it exactly.

    What Lightning 2.6 does by itself: on SIGTERM it finishes the running batch (and a validation
    that is due) and leaves through ``SIGTERMException``, a ``SystemExit`` with status 0, without
    saving anything; with several processes its handler also broadcasts from inside the signal
    handler, which breaks the run ("collective mismatch") when the signal reaches some of the
    processes only. SIGUSR1 it leaves alone, except under SLURM with auto-requeue (its default
    there), where its handler saves ``hpc_ckpt_<n>.ckpt`` wherever the step happens to be, requeues
    the job, and the requeued job resumes from that file.

    While training runs, this callback's handler only notes the signal. At the next step boundary
    (the end of a training batch that stepped the optimiser) every process joins a reduction of the
    notes, so all act together even if the signal reached one of them only: they write the
    checkpoint with ``trainer.save_checkpoint``, run the handlers that were in place before for the
    signals received, except Lightning's SIGTERM handler (its part, stopping, comes next), and leave
    through Lightning's ``SIGTERMException``. So SLURM's requeue still happens, from a consistent
    state, which makes Lightning's ``hpc_ckpt`` exact too. No epoch-end hook runs after the exit:
    stopping with ``trainer.should_stop`` would end the epoch early, and the epoch-end ``last.ckpt``
    would then claim an epoch that was cut short. A validation under way finishes before the step
    boundary comes (SLURM's ``--signal=USR1@<seconds>`` gives the warning that much ahead).

    Signals that arrive before training starts (model loading, sanity check) keep their previous
    handling. Lightning's teardown puts the previous handlers back after the fit.

    Args:
        signals: names of the signals that request the checkpoint, e.g. ``[SIGTERM, SIGUSR1]``
            (SLURM sends ``--signal=USR1@<seconds>`` before the time limit, SIGTERM at it); ``[]``
            turns the callback off.
        dirpath: folder of the checkpoint; ``None``: the ``ModelCheckpoint``'s folder (the run's
            ``checkpoints/``), or ``<default_root_dir>/checkpoints`` without one.
        filename: name of the checkpoint, without ``.ckpt``; it is overwritten by a later preemption.
    """

    def __init__(
        self,
        signals: list[str] = ["SIGTERM", "SIGUSR1"],  # noqa: B006 - read, never mutated
        dirpath: str | None = None,
        filename: str = "preempted",
    ) -> None:
        unknown = [name for name in signals if not isinstance(getattr(signal, name, None), signal.Signals)]
        if unknown:
            raise ValueError(f"unknown signal names {unknown}; use e.g. SIGTERM, SIGUSR1")
        self.signals = [signal.Signals[name] for name in signals]
        self.dirpath = dirpath
        self.filename = filename
        #: path of the checkpoint written on preemption.
        self.path: str | None = None
        self._received: set[int] = set()
        self._previous: dict[int, Any] = {}
        self._group: dist.ProcessGroup | None = None

    @property
    def requested(self) -> bool:
        """Whether one of ``signals`` reached this process during training."""
        return bool(self._received)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning installs its handlers just before training; these replace them until its teardown.
        self._group = None  # a fit may run in a new process group
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self._received.add(signum)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.signals or not self._stepped(trainer, batch_idx):
            return
        received = self._received_anywhere(trainer)
        if not received:
            return
        self.path = os.path.join(self._folder(trainer), f"{self.filename}.ckpt")
        # The full training state, to resume from: Lightning's flag means "save only the weights" (unset,
        # it logs its default). The file still loads with torch.load(weights_only=True).
        trainer.save_checkpoint(self.path, weights_only=False)
        if trainer.is_global_zero:
            log.warning("%s: saved %s at global step %d; resume with --ckpt_path %s",
                        ", ".join(s.name for s in received), self.path, trainer.global_step, self.path)
        for signum in received:
            previous = self._previous.get(signum)
            if signum != signal.SIGTERM and callable(previous):
                previous(signum, None)
        raise SIGTERMException

    def _received_anywhere(self, trainer: Trainer) -> list[signal.Signals]:
        """The signals noted by any process. The notes are summed on the CPU (the default group
        when it is gloo, else a gloo group of its own), so that the check does not wait for the
        device's queued work at every step; one process needs no exchange at all."""
        notes = [int(signum in self._received) for signum in self.signals]
        if trainer.world_size > 1:
            if self._group is None:
                default_is_gloo = dist.get_backend() == dist.Backend.GLOO
                self._group = dist.group.WORLD if default_is_gloo else dist.new_group(backend="gloo")
            summed = torch.tensor(notes)
            dist.all_reduce(summed, group=self._group)
            notes = summed.tolist()
        return [signum for signum, count in zip(self.signals, notes) if count]

    @staticmethod
    def _stepped(trainer: Trainer, batch_idx: int) -> bool:
        """Whether this batch ended with an optimiser step (not mid-way through gradient accumulation)."""
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        return last or (batch_idx + 1) % trainer.accumulate_grad_batches == 0

    def _folder(self, trainer: Trainer) -> str:
        if self.dirpath is not None:
            return self.dirpath
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and getattr(checkpoint, "dirpath", None):
            return checkpoint.dirpath
        return os.path.join(trainer.default_root_dir, "checkpoints")
