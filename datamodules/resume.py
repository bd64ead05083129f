"""Mid-epoch resume of the training data.

Lightning 2.6 restores its loop counters from a checkpoint, but it cannot fast-forward a map-style
loader: after a mid-epoch checkpoint it warns ("your dataloader is not resumable"), continues
``batch_idx`` from the restored count, ends the epoch when that count reaches the epoch's length,
and meanwhile iterates the loader from its start, so the resumed epoch sees its first batches again
and never its last ones.

:func:`resume_position` reads where the next batch belongs from the loop counters, and the training
samplers start that epoch there (:class:`ResumableSampler`,
:meth:`~datamodules.bucketing.DurationBatchSampler.resume_at` with duration bucketing, and
:class:`StepSampler` for WebDataset shards; :func:`resume_loader` moves any of them): the loader
keeps the full epoch's length (Lightning counts the skipped batches as done), and the batches left
out are never loaded.

The counters cannot be read when the loader is built: Lightning builds the train loader *before* it
restores them whenever ``configure_optimizers`` asks for ``trainer.estimated_stepping_batches``
with ``max_epochs`` set (the LR schedule's length; ``max_steps`` alone needs no loader), and then
keeps that loader, and the iterator it started, for the resumed epoch. So the position travels in
the data module's own checkpoint state (:meth:`~datamodules.datamodule.RetrievalDataModule.state_dict`,
written with every checkpoint), which Lightning hands back before ``configure_optimizers`` on one
device and under DDP, and after it under FSDP2 (``ModelParallelStrategy``) and DeepSpeed; a loader
already built by then is moved in place, its persistent workers restarted on the new indices.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from datamodules.bucketing import DurationBatchSampler

__all__ = ["ResumableSampler", "StepSampler", "resume_loader", "resume_position"]


def resume_position(trainer: pl.Trainer | None) -> tuple[int, int]:
    """``(epoch, batches of it already trained)`` for the next training batch of ``trainer``.

    Without a restored checkpoint this is ``(current epoch, 0)``. After one, the counters tell which
    point of the epoch the checkpoint was written at:

    - between epochs (an epoch-end or epoch-start checkpoint): the next epoch, from its start;
    - after the epoch's last batch but before its end hooks (a step checkpoint, a preemption):
      Lightning moves on to the next epoch, so the loader does too;
    - mid-epoch: the same epoch, after the batches whose step completed.
    """
    if trainer is None:
        return 0, 0
    epochs = trainer.fit_loop.epoch_progress.current
    if epochs.started == epochs.processed:
        return epochs.processed, 0
    batches = trainer.fit_loop.epoch_loop.batch_progress
    if batches.is_last_batch:
        return epochs.processed + 1, 0
    return epochs.processed, batches.current.processed


class ResumableSampler(DistributedSamplerWrapper):
    """Shards ``sampler`` over ``num_replicas`` ranks, as Lightning's own wrapper does, and can leave
    the first indices of this rank out of the epoch a checkpoint resumes (:meth:`resume_at`).

    Being a ``DistributedSampler``, Lightning neither re-wraps it under
    ``use_distributed_sampler=True`` nor misses it when it forwards ``set_epoch``. With one replica
    it is ``sampler`` itself, plus the skip.

    Args:
        sampler: the sampler to shard (:class:`~datamodules.datasets.EpochSampler`), which
            shuffles; this wrapper keeps its order.
        num_replicas: number of ranks.
        rank: this process's rank.
    """

    def __init__(self, sampler: Sampler, num_replicas: int, rank: int):
        super().__init__(sampler, num_replicas=num_replicas, rank=rank, shuffle=False)
        self._sampler = sampler
        self._resume = (0, 0)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch here and in ``sampler``, which shuffles by it. Lightning's wrapper forwards
        it itself only from 2.6.1 on; before, every epoch would repeat the first one's order."""
        super().set_epoch(epoch)
        if callable(getattr(self._sampler, "set_epoch", None)):
            self._sampler.set_epoch(epoch)

    def resume_at(self, epoch: int, skip: int) -> None:
        """Start at ``epoch`` and leave out its first ``skip`` indices of this rank (batches done ×
        batch size); the length stays that of a whole epoch."""
        self.set_epoch(epoch)
        self._resume = (epoch, skip)

    def __iter__(self) -> Iterator[Any]:
        # Every pass over the resumed epoch skips, not only the first: a loader with workers asks for
        # two iterators when it starts and uses the second.
        resumed, skip = self._resume
        return islice(super().__iter__(), skip if self.epoch == resumed else 0, None)


class StepSampler(DistributedSampler):
    """Yields ``(epoch, step)`` keys, one per training step of an epoch, for a dataset whose items
    are whole batches of one process (:class:`~datamodules.shards.ShardPairs`, which reads the
    batch of step ``step`` from its shards); pass it to a ``DataLoader`` with ``batch_size=None``.

    The epoch travels inside each key, as with :class:`~datamodules.datasets.EpochSampler`, so
    persistent workers read the right epoch. Lightning calls :meth:`set_epoch` before each epoch,
    and being a ``DistributedSampler`` (each process builds its own, for its own rank) it is never
    re-wrapped under ``use_distributed_sampler=True``. :meth:`resume_at` leaves the steps a
    checkpoint has already trained out of the epoch it resumes.

    Args:
        steps: training steps per epoch (the same on every process).
        num_replicas: number of processes.
        rank: this process's rank.
    """

    def __init__(self, steps: int, num_replicas: int = 1, rank: int = 0):
        # DistributedSampler only keeps the epoch and checks the rank here; the "dataset" is the steps.
        super().__init__(range(steps), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.steps = steps
        self._resume = (0, 0)

    def __len__(self) -> int:
        return self.steps

    def resume_at(self, epoch: int, skip: int) -> None:
        """Start at ``epoch`` and leave out its first ``skip`` steps; the length stays a whole epoch's."""
        self.set_epoch(epoch)
        self._resume = (epoch, skip)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # A generator: the epoch and the position are read at the first step, so an iterator made
        # before a checkpoint's position was restored (without workers) still starts there.
        epoch = self.epoch
        resumed, skip = self._resume
        yield from ((epoch, step) for step in range(skip if epoch == resumed else 0, self.steps))


def resume_loader(loader: DataLoader, epoch: int, done: int, started: bool = False) -> None:
    """Make a train loader of :class:`~datamodules.datamodule.RetrievalDataModule` start at
    ``epoch`` after its first ``done`` batches (a position from :func:`resume_position`).

    Its sampler moves: :class:`ResumableSampler` by ``done`` × batch size indices,
    :class:`~datamodules.bucketing.DurationBatchSampler` and :class:`StepSampler` by ``done`` batches. The sampler is read
    when the first batch is fetched, so an iterator without workers picks the move up even if it
    was created before; persistent workers queue indices as soon as their iterator is created, so a
    loader that was already iterated (``started``) restarts them on the moved sampler (``iter`` of a
    persistent-worker loader resets the one iterator it keeps, the one Lightning holds).
    """
    if isinstance(loader.batch_sampler, DurationBatchSampler):
        loader.batch_sampler.resume_at(epoch, done)
    elif isinstance(loader.sampler, ResumableSampler):
        loader.sampler.resume_at(epoch, done * loader.batch_size)
    elif isinstance(loader.sampler, StepSampler):
        loader.sampler.resume_at(epoch, done)
    else:
        raise TypeError(f"cannot resume a loader whose sampler is {type(loader.sampler).__name__}")
    if started and loader.num_workers > 0:
        iter(loader)
