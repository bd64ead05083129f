"""Callbacks: evaluation reports, embedding projector and writer, hyper-parameter summary, guards, weight
export, progress lines for log files."""

from callbacks.hparams import HyperparameterSummary
from callbacks.prediction_writer import EmbeddingWriter
from callbacks.nonfinite import NonFiniteGuard
from callbacks.preemption import PreemptionCheckpoint
from callbacks.progress import LineProgress
from callbacks.projector import EmbeddingProjector
from callbacks.report import RetrievalReport
from callbacks.rng_state import RngStateCheckpoint
from callbacks.skipped_samples import SkippedSampleReport
from callbacks.trainable_weights import TrainableWeightsExport

__all__ = [
    "EmbeddingProjector",
    "EmbeddingWriter",
    "HyperparameterSummary",
    "LineProgress",
    "NonFiniteGuard",
    "PreemptionCheckpoint",
    "RetrievalReport",
    "RngStateCheckpoint",
    "SkippedSampleReport",
    "TrainableWeightsExport",
]
