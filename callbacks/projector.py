"""A sample of test embeddings for TensorBoard's embedding projector."""

from __future__ import annotations

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics.utilities.data import dim_zero_cat

from datamodules.collate import MAX_DOCS_PER_CLIP
from lightning_modules.metrics import AudioTextRetrieval

__all__ = ["EmbeddingProjector"]


class EmbeddingProjector(Callback):
    """Logs audio and text embeddings of each retrieval test set to TensorBoard's PROJECTOR tab.

    Seeing both modalities in one projection shows the modality gap (Liang et al., "Mind the Gap",
    NeurIPS 2022) and whether a clip's captions cluster around it. For every audio–text or
    speech–text test set, the first ``max_samples`` audios of rank 0 and their captions are logged
    under the tag ``test/<set>``, labelled by modality, clip id and text. It runs before the
    module's epoch end (Lightning calls callbacks first), while the metric still holds the
    embeddings; only with a :class:`TensorBoardLogger`.

    Args:
        max_samples: audios per set (with all their captions); 0 turns the projector off.
    """

    def __init__(self, max_samples: int = 100):
        if max_samples < 0:
            raise ValueError(f"max_samples must be >= 0, got {max_samples}")
        self.max_samples = max_samples
        #: tags logged by the last test epoch.
        self.tags: list[str] = []

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.tags = []
        logger = trainer.logger
        # Only models that embed (EmbeddingModule's evaluators); a re-ranker has nothing to project.
        if (self.max_samples == 0 or not trainer.is_global_zero or not isinstance(logger, TensorBoardLogger)
                or not hasattr(pl_module, "evaluators")):
            return
        datamodule = getattr(trainer, "datamodule", None)
        for evaluator in pl_module.evaluators("test"):
            metric = evaluator.metric
            if not isinstance(metric, AudioTextRetrieval) or not metric.audio_ids:
                continue
            audio_ids = dim_zero_cat(metric.audio_ids)
            keep = audio_ids.unique()[: self.max_samples]
            audio_rows = torch.isin(audio_ids, keep)
            text_rows = torch.isin(dim_zero_cat(metric.text_ids), keep)
            audio_ids, text_keys = audio_ids[audio_rows], dim_zero_cat(metric.text_keys)[text_rows]
            records = datamodule.set_records("test", evaluator.name) if hasattr(datamodule, "set_records") else None

            def clip(index: int) -> str:
                return records[index].id if records is not None else str(index)

            def text(key: int) -> str:
                index, slot = divmod(key, MAX_DOCS_PER_CLIP)
                if records is None:
                    return ""
                # The projector's metadata is tab-separated, one row per line.
                return " ".join(records[index].texts(evaluator.spec.text_field)[slot].split())

            labels = [["audio", clip(int(i)), ""] for i in audio_ids]
            labels += [["text", clip(int(k) // MAX_DOCS_PER_CLIP), text(int(k))] for k in text_keys]
            audio_emb = dim_zero_cat(metric.audio_emb)[audio_rows]
            embeddings = torch.cat([audio_emb, dim_zero_cat(metric.text_emb)[text_rows]])
            tag = f"test/{evaluator.name or 'all'}"
            logger.experiment.add_embedding(
                embeddings.float().cpu(),
                metadata=labels,
                metadata_header=["modality", "clip", "text"],
                tag=tag,
                global_step=trainer.global_step,
            )
            self.tags.append(tag)
