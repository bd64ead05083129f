"""The Lightning data module for audio–text retrieval manifests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.audio import AudioPolicy
from datamodules.bucketing import DurationBatchSampler, manifest_durations
from datamodules.datasets import EpochSampler, EvalDataset, PairDataset
from datamodules.manifest import ClipRecord, read_manifest

__all__ = ["RetrievalDataModule"]

_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class RetrievalDataModule(pl.LightningDataModule):
    """Audio–text pairs for training and the 5-caption retrieval protocol for evaluation.

    Manifests are parsed in :meth:`setup` (files ending in ``.jsonl`` are JSONL rows, ``.json`` the
    AudioCaps/Clotho list format). The sampling rate and the collate function belong to the model:
    call :meth:`bind`, or let the data loaders take them from ``trainer.lightning_module``
    (``backbone.sampling_rate`` and ``collate``).

    Training draws one caption per clip per epoch. The train loader uses :class:`EpochSampler`,
    which Lightning gives the epoch through ``set_epoch`` and which passes it to the dataset inside
    each index, so caption and crop draws change every epoch even with persistent workers, and stay
    reproducible from ``seed``. Validation, test and predict loaders use :class:`EvalDataset`
    (all captions, head crop, fixed order).

    With ``bucket_by_duration`` the train loader batches clips of similar duration
    (:class:`~datamodules.bucketing.DurationBatchSampler`), so less compute goes to padding. The
    durations are read from the audio headers once and cached per manifest in
    ``duration_cache_dir``; clips longer than ``train_max_seconds`` count as that long (they are
    cropped). Batches are full (``drop_last``): the clips that do not fill the last step are left
    out, different ones each epoch.

    Multi-process training (DDP, FSDP): the data module shards every loader itself, the way
    Lightning would (the train clips over the ranks; validation and test with
    ``DistributedSampler``, padded, which the retrieval metric de-duplicates; predict without
    repeats). Lightning leaves loaders whose sampler is already distributed alone, so
    ``Trainer(use_distributed_sampler=...)`` may take either value, except that duration bucketing
    needs ``use_distributed_sampler=False``: Lightning cannot re-shard a custom batch sampler, and
    this one already gives each rank a disjoint, equal-length share.

    Args:
        train_manifest: training manifest (``.jsonl`` or ``.json``).
        val_manifest: validation manifest; ``None`` skips validation.
        test_manifest: test manifest.
        predict_manifest: manifest whose clips :meth:`predict_dataloader` embeds.
        audio_dir: audio folder for ``.json`` list manifests (default: the manifest's folder).
        batch_size: training clips per batch (per device).
        eval_batch_size: clips per evaluation batch; ``None`` uses ``batch_size``.
        num_workers: data-loader worker processes (persistent when > 0).
        train_max_seconds: training clips are randomly cropped to this length; ``None`` keeps them whole.
        eval_max_seconds: evaluation clips keep their first this-many seconds; ``None`` keeps them whole.
        min_seconds: shorter clips are zero-padded at the end to this length.
        caption_fields: caption fields training samples from (``caption``, ``caption_long``,
            ``caption_short``, ``tags``, ...).
        query_instruction: instruction on the audio (query) side; a row's ``instruction`` overrides it.
        document_instruction: instruction on the text (document) side.
        seed: seed of the training order and of the caption and crop draws.
        bucket_by_duration: batch training clips of similar duration (needs
            ``trainer.use_distributed_sampler: false`` with more than one process).
        bucket_pool_multiplier: with bucketing, clips are sorted by duration within random pools of
            ``batch_size * world_size * bucket_pool_multiplier`` clips: larger pools pad less but
            mix less.
        duration_cache_dir: folder of the cached audio durations; ``None`` uses
            ``$XDG_CACHE_HOME/alm-embed/durations`` (``~/.cache/...``), never the dataset's folder.
    """

    def __init__(
        self,
        train_manifest: str | None = None,
        val_manifest: str | None = None,
        test_manifest: str | None = None,
        predict_manifest: str | None = None,
        audio_dir: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_max_seconds: float | None = 10.0,
        eval_max_seconds: float | None = 10.0,
        min_seconds: float = 0.0,
        caption_fields: list[str] = ["caption"],  # noqa: B006 - copied below, never mutated
        query_instruction: str | None = None,
        document_instruction: str | None = None,
        seed: int = 0,
        bucket_by_duration: bool = False,
        bucket_pool_multiplier: int = 32,
        duration_cache_dir: str | None = None,
    ):
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
        if bucket_pool_multiplier < 1:
            raise ValueError(f"bucket_pool_multiplier must be >= 1, got {bucket_pool_multiplier}")
        self.manifests = {
            "train": train_manifest,
            "val": val_manifest,
            "test": test_manifest,
            "predict": predict_manifest,
        }
        self.audio_dir = audio_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_policy = AudioPolicy(train_max_seconds, min_seconds)
        self.eval_policy = AudioPolicy(eval_max_seconds, min_seconds)
        self.caption_fields = list(caption_fields)
        self.query_instruction = query_instruction
        self.document_instruction = document_instruction
        self.seed = seed
        self.bucket_by_duration = bucket_by_duration
        self.bucket_pool_multiplier = bucket_pool_multiplier
        self.duration_cache_dir = duration_cache_dir
        self.records: dict[str, list[ClipRecord]] = {}
        self.sampling_rate: int | None = None
        self.collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None

    def bind(self, sampling_rate: int, collate_fn: Callable[[list[dict[str, Any]]], Any]) -> None:
        """Set the model's audio sampling rate (Hz) and the function that collates item dicts."""
        self.sampling_rate = sampling_rate
        self.collate_fn = collate_fn

    def setup(self, stage: str | None = None) -> None:
        """Parse the manifests the stage needs (all of them when ``stage`` is ``None``)."""
        for split in _STAGE_SPLITS.get(stage, tuple(self.manifests)):
            if self.manifests[split] is not None:
                self._split(split)

    def _bound(self) -> tuple[int, Callable[[list[dict[str, Any]]], Any]]:
        if self.sampling_rate is None or self.collate_fn is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            if module is None:
                raise RuntimeError("call bind(sampling_rate, collate_fn) before asking for a data loader")
            self.bind(module.backbone.sampling_rate, module.collate)
        return self.sampling_rate, self.collate_fn

    def _split(self, split: str) -> list[ClipRecord]:
        if self.manifests[split] is None:
            raise ValueError(f"no {split}_manifest was given")
        if split not in self.records:
            self.records[split] = read_manifest(self.manifests[split], self.audio_dir)
        return self.records[split]

    def _world(self) -> tuple[int, int]:
        """``(world_size, global_rank)`` of the attached trainer; ``(1, 0)`` without one."""
        return getattr(self.trainer, "world_size", 1), getattr(self.trainer, "global_rank", 0)

    def _loader(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        _, collate_fn = self._bound()
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_fn,
            **kwargs,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        sampling_rate, _ = self._bound()
        dataset = EvalDataset(
            self._split(split), sampling_rate, self.eval_policy, self.query_instruction, self.document_instruction
        )
        world, rank = self._world()
        if world == 1:
            return self._loader(dataset, self.eval_batch_size, shuffle=False)
        # The samplers Lightning would inject; given here so use_distributed_sampler=False (needed by
        # bucketing) still shards evaluation. Predictions must not repeat clips; the retrieval metric
        # de-duplicates the padded repeats of DistributedSampler.
        sampler_cls = UnrepeatedDistributedSampler if split == "predict" else DistributedSampler
        sampler = sampler_cls(dataset, num_replicas=world, rank=rank, shuffle=False)
        return self._loader(dataset, self.eval_batch_size, sampler=sampler)

    def train_durations(self) -> np.ndarray:
        """Seconds of every training clip as the model sees it (cropped and padded by the policy)."""
        records = self._split("train")
        durations = manifest_durations(
            self.manifests["train"], [r.audio_path for r in records], self.duration_cache_dir
        )
        upper = self.train_policy.max_seconds if self.train_policy.max_seconds is not None else np.inf
        return np.clip(durations, self.train_policy.min_seconds, upper)

    def train_dataloader(self) -> DataLoader:
        sampling_rate, _ = self._bound()
        dataset = PairDataset(
            self._split("train"),
            sampling_rate,
            self.train_policy,
            train=True,
            seed=self.seed,
            caption_fields=self.caption_fields,
            query_instruction=self.query_instruction,
            document_instruction=self.document_instruction,
        )
        # Lightning creates the first epoch's iterator before its first set_epoch call, so start
        # at the current epoch (non-zero when resuming).
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        world, rank = self._world()
        if self.bucket_by_duration:
            # Lightning keeps the flag on its private accelerator connector. Where it cannot be read,
            # DurationBatchSampler's argument check still stops Lightning from re-wrapping it.
            connector = getattr(self.trainer, "_accelerator_connector", None)
            if world > 1 and getattr(connector, "use_distributed_sampler", False):
                raise ValueError(
                    "bucket_by_duration shards the training batches itself; set "
                    "trainer.use_distributed_sampler to false (Trainer(use_distributed_sampler=False))"
                )
            batches = DurationBatchSampler(
                self.train_durations(),
                self.batch_size,
                pool_multiplier=self.bucket_pool_multiplier,
                drop_last=True,
                seed=self.seed,
                num_replicas=world,
                rank=rank,
            )
            batches.set_epoch(epoch)
            # batch_size=1 is DataLoader's neutral value next to a batch_sampler.
            return self._loader(dataset, 1, batch_sampler=batches)
        sampler = EpochSampler(len(dataset), shuffle=True, seed=self.seed)
        sampler.set_epoch(epoch)
        if world > 1:
            # What Lightning injects under use_distributed_sampler=True; given here so that False
            # shards too. EpochSampler already shuffles, and the wrapper forwards set_epoch to it.
            sampler = DistributedSamplerWrapper(sampler, num_replicas=world, rank=rank, shuffle=False)
            sampler.set_epoch(epoch)
        return self._loader(dataset, self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        # An empty list tells Lightning there is nothing to validate.
        return self._eval_loader("val") if self.manifests["val"] is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")
