"""The Lightning data module for audio–text retrieval manifests."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.audio import AudioPolicy
from datamodules.bad_samples import BadSamplePolicy, SkippedSample, count_reasons, format_counts
from datamodules.bucketing import DurationBatchSampler, manifest_durations
from datamodules.datasets import EpochSampler, EvalDataset, PairDataset
from datamodules.eval_sets import (
    DIRECTION_NAMES,
    METRIC_GROUPS,
    ClassificationLayout,
    EvalSet,
    HardNegative,
    classification_layout,
    qa_layout,
    query_type_layout,
    read_hard_negatives,
)
from datamodules.formats import ManifestSpec
from datamodules.hard_negatives import read_mined
from datamodules.rerank import RerankPairDataset
from datamodules.manifest import ClipRecord, ManifestError, read_manifest, screen_audio
from datamodules.resume import ResumableSampler, resume_loader, resume_position

__all__ = ["RetrievalDataModule"]

log = logging.getLogger(__name__)

_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class RetrievalDataModule(pl.LightningDataModule):
    """Audio–text pairs for training and the 5-caption retrieval protocol for evaluation.

    Manifests are parsed in :meth:`setup`. Each manifest setting is a path, its format detected
    (``.jsonl`` rows, a ``.json`` list or WavCaps file, a Clotho / AudioCaps / NLI ``.csv`` by its
    header, ``.parquet`` / ``.arrow`` files or a Hugging Face dataset folder), or a
    :class:`~datamodules.formats.ManifestSpec` mapping naming the format and its options (audio
    folder, AudioCaps file-name template, table columns); see :mod:`datamodules.formats`. The sampling rate and the collate function belong to the model
    and are given explicitly with :meth:`bind` (the CLI binds the model's ``backbone.sampling_rate``
    and ``collate`` once both are built); the data module never reads them off the trainer.

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

    Resuming from a mid-epoch checkpoint, the train loader starts after the batches already trained
    in that epoch, so the resumed run sees the same batches as an uninterrupted one. The position is
    part of every checkpoint (:meth:`state_dict`), because Lightning may build the train loader
    before it restores its own counters (see :mod:`datamodules.resume`).

    Multi-process training (DDP, FSDP): the data module shards every loader itself, the way
    Lightning would (the train clips over the ranks; validation and test with
    ``DistributedSampler``, padded, which the retrieval metric de-duplicates; predict without
    repeats). Lightning leaves loaders whose sampler is already distributed alone, so
    ``Trainer(use_distributed_sampler=...)`` may take either value, except that duration bucketing
    needs ``use_distributed_sampler=False``: Lightning cannot re-shard a custom batch sampler, and
    this one already gives each rank a disjoint, equal-length share.

    Evaluation can run on several named sets at once (``val_sets`` / ``test_sets``, each an
    :class:`~datamodules.eval_sets.EvalSet` with its own task: audio–text, speech–text, QA by
    retrieval or zero-shot classification); the loaders come in the order of the mapping and each
    set's metrics are reported under its name. ``val_manifest`` / ``test_manifest`` are the shorthand for one unnamed
    audio–text set (metric keys without a set name, e.g. ``val/t2a/R@1``).

    Args:
        train_manifest: training manifest: a path or a ``ManifestSpec`` mapping (``{path, format,
            audio_dir, file_template, audio_column, caption_columns, id_column, audio_cache_dir}``).
        val_manifest: validation manifest (one unnamed audio–text set); ``None`` skips validation
            unless ``val_sets`` is given.
        test_manifest: test manifest (one unnamed audio–text set).
        val_sets: named validation sets, e.g. ``{audiocaps: {manifest: ...}, clotho: {manifest: ...,
            text_text: true}}``; excludes ``val_manifest``.
        test_sets: named test sets; excludes ``test_manifest``.
        predict_manifest: manifest whose clips :meth:`predict_dataloader` embeds (see also
            :meth:`predict_on`, which points predict at another split).
        audio_dir: audio folder of the manifests whose rows name files (JSON list, WavCaps, Clotho,
            AudioCaps, Hugging Face paths) and whose spec gives none (default: the manifest's folder).
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
            Used only with ``check_audio_headers: false``: the header scan already gives the durations.
        on_bad_sample: what a bad manifest row or audio file does (reasons in
            :mod:`datamodules.bad_samples`): ``"error"`` stops with an error naming the manifest,
            the line (or JSON-list entry) and the audio file; ``"skip"`` drops the sample and counts
            it by reason (never replacing it, so its batch is smaller). Rows and headers dropped in
            :meth:`setup` are in :attr:`skipped`; clips that fail to decode later are counted per
            batch; :class:`callbacks.SkippedSampleReport` logs both at every epoch end.
        check_audio_headers: read every clip's audio header in :meth:`setup` (cheap, no decoding),
            so that empty, corrupt or unsupported files are found before training rather than
            when first loaded; ``False`` saves the scan on very large corpora.
        mined_negatives: mined neighbours of the training clips (``python main.py mine``), for the
            re-ranker's training groups (:class:`datamodules.rerank.RerankPairDataset`); ``None``:
            plain pairs.
        num_negatives: hard negatives per training query (with ``mined_negatives``).
        negative_directions: which direction each re-ranker training query takes: ``"both"`` draws
            audio→text or text→audio with probability 1/2 (AuroLA), or one of them.
        text_hard_negatives: text-pair rows (``query_text`` / ``document_text``, the SimCSE NLI CSV's
            ``sent0`` / ``sent1``) give their ``hard_negatives`` (``hard_neg``) to the loss as extra
            documents of the batch; ``False`` leaves them unused, as AuroLA does.
    """

    def __init__(
        self,
        train_manifest: str | ManifestSpec | None = None,
        val_manifest: str | ManifestSpec | None = None,
        test_manifest: str | ManifestSpec | None = None,
        predict_manifest: str | ManifestSpec | None = None,
        val_sets: dict[str, EvalSet] | None = None,
        test_sets: dict[str, EvalSet] | None = None,
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
        on_bad_sample: BadSamplePolicy = "error",
        check_audio_headers: bool = True,
        mined_negatives: str | None = None,
        num_negatives: int = 0,
        negative_directions: Literal["both", "a2t", "t2a"] = "both",
        text_hard_negatives: bool = True,
    ):
        super().__init__()
        if on_bad_sample not in get_args(BadSamplePolicy):
            raise ValueError(f"on_bad_sample must be one of {get_args(BadSamplePolicy)}, got {on_bad_sample!r}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
        if bucket_pool_multiplier < 1:
            raise ValueError(f"bucket_pool_multiplier must be >= 1, got {bucket_pool_multiplier}")
        self.manifests = {
            "train": _manifest_setting(train_manifest),
            "val": _manifest_setting(val_manifest),
            "test": _manifest_setting(test_manifest),
            "predict": _manifest_setting(predict_manifest),
        }
        self.named_sets = {"val": dict(val_sets or {}), "test": dict(test_sets or {})}
        for split, sets in self.named_sets.items():
            if sets and self.manifests[split] is not None:
                raise ValueError(f"give either {split}_manifest or {split}_sets, not both")
            for name, spec in sets.items():
                _check_set_name(name)
                if not isinstance(spec, EvalSet):
                    sets[name] = EvalSet(**spec) if isinstance(spec, dict) else spec
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
        self.on_bad_sample = on_bad_sample
        self.check_audio_headers = check_audio_headers
        if num_negatives and mined_negatives is None:
            raise ValueError("num_negatives needs a mined_negatives file (python main.py mine)")
        self.mined_negatives = mined_negatives
        self.num_negatives = num_negatives
        self.negative_directions = negative_directions
        self.text_hard_negatives = text_hard_negatives
        self.records: dict[str, list[ClipRecord]] = {}
        #: samples dropped in setup under ``skip``, per record key (``train``, ``val``, ``val/<set name>``, ...).
        self.skipped: dict[str, list[SkippedSample]] = {}
        self._hard_negatives: dict[str, list[HardNegative]] = {}
        # (split, set name) that predict embeds instead of predict_manifest; see predict_on.
        self._predict_source: tuple[str, str | None] | None = None
        self._layouts: dict[str, ClassificationLayout] = {}
        # durations read by the header scan in setup, so that bucketing does not read the headers again.
        self._header_durations: dict[str, np.ndarray] = {}
        self.sampling_rate: int | None = None
        self.collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None
        # (epoch, batches done) restored from a checkpoint, and the last train loader built.
        self._resume: tuple[int, int] | None = None
        self._train_loader: DataLoader | None = None

    def bind(self, sampling_rate: int, collate_fn: Callable[[list[dict[str, Any]]], Any]) -> None:
        """Set the model's audio sampling rate (Hz) and the function that collates item dicts."""
        self.sampling_rate = sampling_rate
        self.collate_fn = collate_fn

    def setup(self, stage: str | None = None) -> None:
        """Parse the manifests the stage needs (all of them when ``stage`` is ``None``)."""
        for split in _STAGE_SPLITS.get(stage, tuple(self.manifests)):
            if split == "predict" and self._predict_source is not None:
                self.predict_records()
            elif split in self.named_sets:
                # Parsed here so that a bad file stops the run before any model work.
                for name, _ in self.eval_sets(split):
                    self.set_records(split, name)
                    self.hard_negatives(split, name)
                    self.classification(split, name)
                    self.query_types(split, name)
            elif self.manifests[split] is not None:
                self._split(split)

    def predict_on(self, split: str, name: str | None = None) -> None:
        """Make ``predict`` embed the clips of ``train``, ``val`` or ``test`` instead of ``predict_manifest``.

        Hard-negative mining (``python main.py mine``) embeds the training clips this way. ``name``
        picks one named set of ``val`` / ``test``; a split with several named sets needs it. The
        split is resolved when the clips are first read, so data modules that generate their
        manifests in :meth:`prepare_data` (:class:`~datamodules.synthetic.SyntheticDataModule`)
        may be pointed before they exist.
        """
        if split not in ("train", "val", "test"):
            raise ValueError(f"predict_on takes train, val or test, got {split!r}")
        if split == "train" and name is not None:
            raise ValueError(f"the train split has no named sets, got {name!r}")
        self._predict_source = (split, name)

    def predict_records(self) -> list[ClipRecord]:
        """The clips :meth:`predict_dataloader` embeds, in manifest order (parsed once)."""
        return self._predict_set()[0]

    def _predict_set(self) -> tuple[list[ClipRecord], str]:
        """The clips predict embeds and the field holding their texts."""
        if self._predict_source is None:
            return self._split("predict"), "caption"
        split, name = self._predict_source
        if split == "train":
            records = self._split("train")
            if not records:
                raise ManifestError(f"{self.manifests['train']}: the train set has no clips")
            return records, "caption"
        sets = self.eval_sets(split)
        if not sets:
            raise ValueError(f"no {split} set: give {split}_manifest or {split}_sets")
        if name is None and len(sets) > 1:
            raise ValueError(f"the {split} split has several sets {[n for n, _ in sets]}; name the one to embed")
        name = sets[0][0] if name is None else name
        spec = self._eval_set(split, name)
        if spec.task == "qa":
            raise ValueError(f"{split} set {name!r} is a QA set; predict embeds clips and their texts")
        return self.set_records(split, name), spec.text_field

    def eval_sets(self, split: str) -> list[tuple[str | None, EvalSet]]:
        """The ``(name, set)`` pairs of ``val`` or ``test``, in loader order.

        The shorthand ``<split>_manifest`` gives one audio–text set named ``None``.
        """
        if self.named_sets[split]:
            return list(self.named_sets[split].items())
        if self.manifests[split] is not None:
            return [(None, EvalSet(self.manifests[split]))]
        return []

    def _eval_set(self, split: str, name: str | None) -> EvalSet:
        for set_name, spec in self.eval_sets(split):
            if set_name == name:
                return spec
        raise KeyError(f"no {split} set named {name!r}")

    def set_records(self, split: str, name: str | None) -> list[ClipRecord]:
        """The clips of one evaluation set (parsed once).

        Raises:
            ManifestError: the manifest is bad, or the set has no clips.
        """
        if name is None:
            return self._split(split)
        key = f"{split}/{name}"
        if key not in self.records:
            spec = self._eval_set(split, name)
            records = self._read(key, spec.manifest, spec.audio_dir or self.audio_dir)
            if not records:
                raise ManifestError(f"{spec.manifest}: evaluation set '{name}' has no clips")
            self.records[key] = records
        return self.records[key]

    def hard_negatives(self, split: str, name: str | None) -> list[HardNegative] | None:
        """The parsed hard-negative triples of a set, or ``None`` when it has none."""
        spec = self._eval_set(split, name)
        if spec.hard_negatives is None:
            return None
        key = f"{split}/{name}/hard_negatives"
        if key not in self._hard_negatives:
            self._hard_negatives[key] = read_hard_negatives(spec.hard_negatives, self.set_records(split, name))
        return self._hard_negatives[key]

    def classification(self, split: str, name: str | None) -> ClassificationLayout | None:
        """Classes and labels of a classification set (parsed once), or ``None`` for other tasks."""
        spec = self._eval_set(split, name)
        if spec.task != "classification":
            return None
        key = f"{split}/{name}/classes"
        if key not in self._layouts:
            self._layouts[key] = classification_layout(self.set_records(split, name), spec.classes)
        return self._layouts[key]

    def query_types(self, split: str, name: str | None) -> tuple[list[list[int]], list[str]] | None:
        """Per clip, the query type index of each text, and the type names, of a retrieval set whose
        rows carry ``query_type`` (:func:`~datamodules.eval_sets.query_type_layout`); else ``None``."""
        spec = self._eval_set(split, name)
        if spec.task not in DIRECTION_NAMES:
            return None
        return query_type_layout(self.set_records(split, name), spec.text_field)

    def _bound(self) -> tuple[int, Callable[[list[dict[str, Any]]], Any]]:
        if self.sampling_rate is None or self.collate_fn is None:
            raise RuntimeError(
                f"{type(self).__name__} has no model binding: call bind(sampling_rate, collate_fn) with the "
                "model's backbone rate and collator before asking for a data loader (the CLI does it)"
            )
        return self.sampling_rate, self.collate_fn

    def _split(self, split: str) -> list[ClipRecord]:
        if self.manifests[split] is None:
            raise ValueError(f"no {split}_manifest was given")
        if split not in self.records:
            records = self._read(split, self.manifests[split], self.audio_dir)
            if not records and split != "train":
                raise ManifestError(f"{self.manifests[split]}: the {split} set has no clips")
            self.records[split] = records
        return self.records[split]

    def _read(self, key: str, manifest: str | ManifestSpec, audio_dir: str | None) -> list[ClipRecord]:
        """Parse a manifest and screen its audio headers under the ``on_bad_sample`` policy."""
        problems: list[SkippedSample] | None = [] if self.on_bad_sample == "skip" else None
        records = read_manifest(manifest, audio_dir, problems)
        if self.check_audio_headers:
            records, durations = screen_audio(records, problems)
            self._header_durations[key] = np.asarray(durations, dtype=np.float64)
        if problems:
            counts = format_counts(count_reasons(problems))
            total = len(records) + len(problems)
            log.warning("%s: skipped %d of %d rows of %s (%s)", key, len(problems), total, manifest, counts)
        self.skipped[key] = problems or []
        return records

    def skipped_counts(self, split: str) -> dict[str, int]:
        """Samples of a split (``train``, ``val``, ``test``, ``predict``; every named set of it)
        dropped in :meth:`setup`, by reason."""
        keys = [key for key in self.skipped if key == split or key.startswith(f"{split}/")]
        return dict(count_reasons(sample for key in keys for sample in self.skipped[key]))

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
            # Each new iterator draws the workers' base seed from this generator rather than the global
            # one, so dropout's random stream does not depend on how many loaders were iterated (after
            # a checkpoint at an epoch's last batch, the resumed run skips that epoch's validation).
            generator=torch.Generator().manual_seed(self.seed),
            # Page-locked batches let the copy to a CUDA device run asynchronously.
            pin_memory=isinstance(getattr(self.trainer, "accelerator", None), CUDAAccelerator),
            **kwargs,
        )

    def _eval_loader(self, split: str, name: str | None = None) -> DataLoader:
        sampling_rate, _ = self._bound()
        if split == "predict":
            (records, text_field), qa = self._predict_set(), None
        else:
            spec = self._eval_set(split, name)
            records, text_field = self.set_records(split, name), spec.text_field
            qa = qa_layout(records, spec.category_field)[:2] if spec.task == "qa" else None
        dataset = EvalDataset(
            records,
            sampling_rate,
            self.eval_policy,
            self.query_instruction,
            self.document_instruction,
            text_field=text_field,
            on_bad_sample=self.on_bad_sample,
            qa=qa,
            with_documents=split == "predict" or spec.task != "classification",
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
        durations = self._header_durations.get("train")
        if durations is None:
            durations = manifest_durations(
                self.manifests["train"], [r.audio_path for r in records], self.duration_cache_dir
            )
        upper = self.train_policy.max_seconds if self.train_policy.max_seconds is not None else np.inf
        return np.clip(durations, self.train_policy.min_seconds, upper)

    def train_pairs(self, records: list, sampling_rate: int) -> PairDataset:
        """The training pairs of ``records`` under this data module's settings (the shard data module
        fills the records in per sample)."""
        return PairDataset(
            records,
            sampling_rate,
            self.train_policy,
            train=True,
            seed=self.seed,
            caption_fields=self.caption_fields,
            query_instruction=self.query_instruction,
            document_instruction=self.document_instruction,
            on_bad_sample=self.on_bad_sample,
            hard_negatives=self.text_hard_negatives,
        )

    def train_dataloader(self) -> DataLoader:
        sampling_rate, _ = self._bound()
        dataset = self.train_pairs(self._split("train"), sampling_rate)
        if self.mined_negatives is not None:
            records = self._split("train")
            mined = read_mined(self.mined_negatives, [record.id for record in records])
            dataset = RerankPairDataset(dataset, mined, self.num_negatives, self.negative_directions)
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
            # batch_size=1 is DataLoader's neutral value next to a batch_sampler.
            loader = self._loader(dataset, 1, batch_sampler=batches)
        else:
            # What Lightning injects under use_distributed_sampler=True; given here so that False
            # shards too. EpochSampler already shuffles, and the wrapper forwards set_epoch to it.
            sampler = ResumableSampler(EpochSampler(len(dataset), shuffle=True, seed=self.seed), world, rank)
            loader = self._loader(dataset, self.batch_size, sampler=sampler, drop_last=True)
        return self._resumed(loader)

    def _resumed(self, loader: DataLoader) -> DataLoader:
        """The new train loader, set to start where training resumes, and kept for :meth:`load_state_dict`."""
        # Lightning creates the first epoch's iterator before its first set_epoch call, so start at
        # the epoch it resumes, after the batches a mid-epoch checkpoint has already trained.
        position = self._resume if self._resume is not None else resume_position(self.trainer)
        self._resume = None
        resume_loader(loader, *position)
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: where the next training batch belongs, ``(epoch, batches of
        it done)`` (see :mod:`datamodules.resume`)."""
        return {"train_position": list(resume_position(self.trainer))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training data where a checkpoint's :meth:`state_dict` says (only when fitting:
        ``validate`` and ``test`` read checkpoints too). A train loader Lightning has already built
        is moved in place; otherwise the next one starts there."""
        fitting = self.trainer is None or self.trainer.state.fn == "fit"
        if "train_position" not in state_dict or not fitting:
            return
        epoch, done = state_dict["train_position"]
        if self._train_loader is None:
            self._resume = (epoch, done)
        else:
            resume_loader(self._train_loader, epoch, done, started=True)

    def teardown(self, stage: str) -> None:
        if stage == "fit":  # a later fit builds its own loader, from its own position
            self._train_loader, self._resume = None, None

    def _eval_loaders(self, split: str) -> DataLoader | list[DataLoader]:
        """One loader per evaluation set (a bare loader for a single set; ``[]`` for none)."""
        loaders = [self._eval_loader(split, name) for name, _ in self.eval_sets(split)]
        return loaders[0] if len(loaders) == 1 else loaders

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        # An empty list tells Lightning there is nothing to validate.
        return self._eval_loaders("val")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        if not self.eval_sets("test"):
            raise ValueError("no test set: give test_manifest or test_sets")
        return self._eval_loaders("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")


def _manifest_setting(manifest: str | ManifestSpec | dict | None) -> str | ManifestSpec | None:
    """A manifest setting as given (a path or a spec); a spec's mapping, as Python callers may pass
    it, becomes a :class:`~datamodules.formats.ManifestSpec`."""
    return ManifestSpec(**manifest) if isinstance(manifest, dict) else manifest


def _check_set_name(name: str) -> None:
    """Set names become a metric-key level, so they must not look like one of the other levels."""
    if not name or "/" in name or name in METRIC_GROUPS:
        raise ValueError(f"invalid evaluation set name {name!r}: non-empty, no '/', not one of {sorted(METRIC_GROUPS)}")
