"""Manifests, audio decoding, datasets and data modules for audio–text retrieval."""

from datamodules.audio import AudioDecodeError, AudioPolicy, audio_duration, load_audio
from datamodules.bad_samples import REASONS, SkippedSample
from datamodules.collate import PairCollator
from datamodules.inputs import Collator, EmbedInput
from datamodules.bucketing import DurationBatchSampler, manifest_durations
from datamodules.datamodule import RetrievalDataModule
from datamodules.datasets import EpochSampler, EvalDataset, PairDataset
from datamodules.formats import ManifestSpec
from datamodules.manifest import ClipRecord, ManifestError, read_json_list, read_jsonl, read_manifest, screen_audio
from datamodules.rerank import RerankCollator, RerankPairDataset, RerankPrompts
from datamodules.shards import WebDatasetDataModule
from datamodules.synthetic import SyntheticDataModule, make_synthetic_dataset

__all__ = [
    "AudioDecodeError",
    "AudioPolicy",
    "ClipRecord",
    "Collator",
    "EmbedInput",
    "DurationBatchSampler",
    "EpochSampler",
    "EvalDataset",
    "ManifestError",
    "ManifestSpec",
    "PairCollator",
    "PairDataset",
    "REASONS",
    "RerankCollator",
    "RerankPairDataset",
    "RerankPrompts",
    "RetrievalDataModule",
    "SkippedSample",
    "SyntheticDataModule",
    "WebDatasetDataModule",
    "audio_duration",
    "load_audio",
    "make_synthetic_dataset",
    "manifest_durations",
    "read_json_list",
    "read_jsonl",
    "read_manifest",
    "screen_audio",
]
