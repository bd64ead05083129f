"""Callbacks: evaluation reports, embedding writer, hyper-parameter summary, trainable-weight export."""

from callbacks.hparams import HyperparameterSummary
from callbacks.prediction_writer import EmbeddingWriter
from callbacks.report import RetrievalReport
from callbacks.trainable_weights import TrainableWeightsExport

__all__ = ["EmbeddingWriter", "HyperparameterSummary", "RetrievalReport", "TrainableWeightsExport"]
