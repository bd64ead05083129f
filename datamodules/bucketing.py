"""Length-bucketed training batches: clips of similar duration share a batch.

Audio batches are padded to their longest clip, so a random batch mixing a 2 s clip with a 30 s one
spends most of its compute on padding. :class:`DurationBatchSampler` groups clips of similar
duration while keeping the epoch random: it shuffles the clips, sorts them by duration inside large
pools, cuts the pools into batches and shuffles the batches.

Durations come from the audio headers (no decoding) through :func:`manifest_durations`, which reads
them once per manifest and caches them in a JSON file keyed by the manifest's path and
modification time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from datamodules.audio import audio_duration
from datamodules.datasets import EpochSampler

__all__ = ["DurationBatchSampler", "default_duration_cache_dir", "manifest_durations"]

_CACHE_VERSION = 1


def default_duration_cache_dir() -> str:
    """``$XDG_CACHE_HOME/alm-embed/durations`` (``~/.cache/alm-embed/durations`` by default).

    A per-user cache rather than the manifest's folder, because dataset folders are often shared and
    read-only.
    """
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "alm-embed", "durations")


def _cache_path(manifest: str, cache_dir: str) -> str:
    # One file per manifest (named by its absolute path), overwritten when the manifest changes,
    # so stale entries do not pile up.
    digest = hashlib.sha1(manifest.encode("utf-8")).hexdigest()[:16]
    return os.path.join(cache_dir, f"{os.path.basename(manifest)}.{digest}.json")


def _manifest_stamp(manifest: str) -> dict[str, object]:
    stat = os.stat(manifest)
    # Size as well as mtime: a rewrite within the file system's timestamp resolution still changes
    # the stamp when the content length changes.
    return {"version": _CACHE_VERSION, "manifest": manifest, "mtime_ns": stat.st_mtime_ns, "size": stat.st_size}


def _read_cache(path: str, stamp: dict[str, object], audio_paths: list[str]) -> np.ndarray | None:
    try:
        with open(path, encoding="utf-8") as handle:
            cached = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(cached, dict) or any(cached.get(k) != v for k, v in stamp.items()):
        return None
    # The same manifest can resolve to other files (a JSON list read with another audio_dir).
    if cached.get("audio_paths") != audio_paths:
        return None
    return np.asarray(cached["durations"], dtype=np.float64)


def _write_cache(path: str, payload: dict[str, object]) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Write a temporary file and rename it, so concurrent ranks never read a half-written cache.
        handle, scratch = tempfile.mkstemp(prefix=".durations-", suffix=".json", dir=os.path.dirname(path))
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(payload, out)
            os.replace(scratch, path)
        except BaseException:
            os.unlink(scratch)
            raise
    except OSError as err:
        warnings.warn(f"cannot write the duration cache {path} ({err}); durations will be read again next time")


def manifest_durations(manifest: str, audio_paths: Sequence[str], cache_dir: str | None = None) -> np.ndarray:
    """Durations (seconds) of a manifest's audio files, read from their headers once and cached.

    The cache is a JSON file in ``cache_dir``, valid while the manifest's path, modification time
    and size and the list of audio paths are unchanged. A cache that cannot be written (read-only
    folder, full disk) only costs a warning: the durations are returned all the same.

    Args:
        manifest: the manifest the clips were read from (the cache key).
        audio_paths: the clips' resolved audio paths, in manifest order.
        cache_dir: folder of the cache files; ``None`` uses :func:`default_duration_cache_dir`.

    Returns:
        A float64 array, one duration per path.

    Raises:
        AudioDecodeError: an audio file is missing or its header cannot be read.
    """
    manifest = os.path.abspath(manifest)
    audio_paths = [os.path.abspath(p) for p in audio_paths]
    stamp = _manifest_stamp(manifest)
    path = _cache_path(manifest, cache_dir or default_duration_cache_dir())
    durations = _read_cache(path, stamp, audio_paths)
    if durations is None:
        durations = np.array([audio_duration(p) for p in audio_paths], dtype=np.float64)
        _write_cache(path, {**stamp, "audio_paths": audio_paths, "durations": durations.tolist()})
    return durations


def _distributed_defaults(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas} and {rank}")
    return num_replicas, rank


class DurationBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of clips of similar duration, reshuffled every epoch, sharded over ranks.

    Each epoch (deterministic given ``seed`` and the epoch from :meth:`set_epoch`):

    1. The clips are permuted at random (by :class:`EpochSampler`, held as :attr:`sampler`).
    2. The permutation is cut into pools of ``batch_size * num_replicas * pool_multiplier`` clips;
       each pool is sorted by duration (ties keep the random order).
    3. Each sorted pool is cut into *global batches* of ``batch_size * num_replicas`` consecutive
       clips, and the global batches are shuffled. Rank ``r`` takes the ``r``-th slice of
       ``batch_size`` clips of every global batch.

    So all ranks get the same number of batches, no clip goes to two ranks, and the ranks of one
    optimisation step share one bucket: a step lasts as long as its slowest rank, so bucketing each
    rank's shard on its own would pair short batches with long ones and save little. Larger pools
    give tighter buckets but a less random batch composition; the default pool is 32 global batches.

    ``drop_last=True`` keeps ``len(durations) // (batch_size * num_replicas)`` full global batches;
    the clips left over are the last ones of the epoch's random permutation, so different clips are
    left out each epoch and no duration range is systematically skipped. ``drop_last=False`` keeps
    every clip: the permutation is padded by repeating its first clips to a multiple of
    ``num_replicas`` (as ``DistributedSampler`` does), and the one short global batch comes last,
    split evenly over the ranks (each rank's last batch then has fewer than ``batch_size`` clips).

    Batches hold ``(epoch, index)`` keys, as :class:`EpochSampler` yields, so
    :class:`~datamodules.datasets.PairDataset` draws the epoch's captions and crops in any worker.
    Pass it to a ``DataLoader`` as ``batch_sampler``. Lightning calls ``set_epoch`` on the batch
    sampler's :attr:`sampler`, which is where the epoch is kept. Under multi-process training
    Lightning must not replace it: use ``Trainer(use_distributed_sampler=False)``.

    Args:
        durations: duration of every clip, in seconds (what the model sees, i.e. after any crop).
        batch_size: clips per batch on each rank.
        pool_multiplier: global batches per sorting pool.
        drop_last: drop the clips that do not fill a global batch (see above).
        seed: base seed of the clip permutation and the batch order.
        num_replicas: number of ranks; ``None`` reads ``torch.distributed`` (1 when not initialised).
        rank: this process's rank; ``None`` reads ``torch.distributed`` (0 when not initialised).
    """

    def __init__(
        self,
        durations: Sequence[float] | np.ndarray,
        batch_size: int,
        pool_multiplier: int = 32,
        drop_last: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        if not isinstance(durations, (Sequence, np.ndarray)):
            # Lightning re-instantiates unknown batch samplers as cls(sampler, batch_size=..., ...):
            # fail loudly rather than bucket by sampler indices.
            raise TypeError(
                f"durations must be a sequence of clip durations, got {type(durations).__name__}; under "
                "multi-process training pass Trainer(use_distributed_sampler=False)"
            )
        if batch_size < 1 or pool_multiplier < 1:
            raise ValueError(f"batch_size and pool_multiplier must be >= 1, got {batch_size} and {pool_multiplier}")
        self.durations = np.asarray(durations, dtype=np.float64)
        if self.durations.ndim != 1 or not np.isfinite(self.durations).all():
            raise ValueError("durations must be a 1-D list of finite numbers")
        self.batch_size = batch_size
        self.pool_multiplier = pool_multiplier
        self.drop_last = drop_last
        self.seed = seed
        self.num_replicas, self.rank = _distributed_defaults(num_replicas, rank)
        self.sampler = EpochSampler(len(self.durations), shuffle=True, seed=seed)
        self._resume = (0, 0)

    @property
    def epoch(self) -> int:
        """The epoch whose batches the next iteration yields."""
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and random draws the next iteration uses."""
        self.sampler.set_epoch(epoch)

    def resume_at(self, epoch: int, skip: int) -> None:
        """Start at ``epoch`` and leave its first ``skip`` batches out, as a checkpoint written after
        them requires (see :mod:`datamodules.resume`); the length stays that of a whole epoch."""
        self.set_epoch(epoch)
        self._resume = (epoch, skip)

    def _clips_per_rank(self) -> int:
        n, world = len(self.durations), self.num_replicas
        if self.drop_last:
            return n // (self.batch_size * world) * self.batch_size
        return math.ceil(n / world)

    def __len__(self) -> int:
        return math.ceil(self._clips_per_rank() / self.batch_size)

    def global_batches(self) -> list[np.ndarray]:
        """This epoch's global batches (clip indices of all ranks, rank 0's slice first), in order."""
        epoch = self.epoch
        order = np.array([index for _, index in self.sampler], dtype=np.int64)
        total = self._clips_per_rank() * self.num_replicas
        # Truncating or wrapping the random permutation (never the sorted one) keeps the dropped or
        # repeated clips a random choice.
        order = np.resize(order, total) if len(order) else order
        step = self.batch_size * self.num_replicas
        pool_size = step * self.pool_multiplier
        full, short = [], []
        for start in range(0, total, pool_size):
            pool = order[start : start + pool_size]
            pool = pool[np.argsort(self.durations[pool], kind="stable")]
            for cut in range(0, len(pool), step):
                (full if len(pool) - cut >= step else short).append(pool[cut : cut + step])
        rng = np.random.default_rng([self.seed, epoch, 1])  # a stream apart from the permutation's
        return [full[i] for i in rng.permutation(len(full))] + short

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        resumed, skip = self._resume
        for batch in self.global_batches()[skip if epoch == resumed else 0 :]:
            share = len(batch) // self.num_replicas  # batch_size except in the short last batch
            mine = batch[self.rank * share : (self.rank + 1) * share]
            yield [(epoch, int(index)) for index in mine]
