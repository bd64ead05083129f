"""The LightningModule that turns a backbone into a retrieval embedding model."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device

from datamodules.collate import PairCollator
from datamodules.inputs import EmbedInput
from lightning_modules.backbones.base import Backbone
from lightning_modules.evaluation import Evaluator, build_evaluators, mean_over_sets
from lightning_modules.finetune import FineTuneModule
from lightning_modules.grad_cache import GradCache
from lightning_modules.guide import TextGuide
from lightning_modules.heads import Head, IdentityHead
from lightning_modules.poolers import Pooler
from losses.base import ContrastiveLoss, LossOutput
from losses.infonce import InfoNCE
from losses.structure import BatchInfo
from losses.tag_clusters import TagClusterMap


class EmbeddingModule(FineTuneModule):
    """Audio–text embedding model: backbone → pooler → head → L2 norm, trained contrastively.

    The parts are injected (each chosen by ``class_path`` in the YAML config), so a recipe is a
    choice of backbone, pooler, head and loss. Training embeds the query side (audio, or audio and
    question) and the document side (caption or answer) of each pair and applies the loss to the
    embeddings and the batch's :class:`~losses.structure.BatchInfo`; validation and test embed every
    clip and all its captions and report the metrics of each evaluation set the data module declares
    (``eval_sets``; see :mod:`lightning_modules.evaluation`): ``val/t2a/R@1`` ... ``test/a2t/mAP@10``
    (in percent) for one unnamed set, and ``test/<set>/<metric>`` plus the mean over the audio–text
    sets (``test/t2a/R@1``) for named ones.

    Optimiser, schedule, slim checkpoints and ``init_from`` come from :class:`FineTuneModule`; the
    non-finite guard, RNG checkpoint state, FSDP2 and GradCache live outside the module (see there).

    Args:
        backbone: the audio language model used as an encoder.
        pooler: how a sequence of hidden states becomes one vector.
        head: projection into the embedding space (input width taken from the backbone).
        loss: contrastive loss on the normalised query and document embeddings.
        grad_cache_chunk_size: embed the batch in chunks of this many items with GradCache (Gao
            et al., 2021): a large contrastive batch at the activation memory of one chunk, with
            the same gradients as the plain step. Uses manual optimisation, so the trainer's
            ``accumulate_grad_batches`` and ``gradient_clip_val`` must stay unset. ``None``: off.
        guide: frozen text scorer whose caption×caption similarities are passed to the loss as
            ``guide_scores`` (for :class:`losses.GuideModelMasker`); ``None``: no guide.
        tag_cluster_file: AuroLA-style ``{tag: {"cluster_index": int | null}}`` JSON grouping
            synonymous tags, for tag-cluster positives (Hybrid-NCE); without it every tag is its
            own cluster.
        init_from: start from the trainable weights of an earlier run (e.g. ALM2Vec stage 1 →
            stage 2): a ``.safetensors`` file of trainable weights or a Lightning ``.ckpt``.
        init_merge_lora: with ``init_from`` (a ``.ckpt``), merge the earlier run's LoRA update into
            the base weights and train this recipe's own, fresh adapters on top, of any rank (AuroLA's
            text stage, r 64, hands over to its audio stage, r 128, this way).
        **kwargs: optimiser settings of :class:`FineTuneModule` (``learning_rate``,
            ``weight_decay``, ``betas``, ``warmup_steps``, ``min_lr_ratio``).
    """

    def __init__(
        self,
        backbone: Backbone,
        pooler: Pooler,
        head: Head | None = None,
        loss: ContrastiveLoss | None = None,
        grad_cache_chunk_size: int | None = None,
        guide: TextGuide | None = None,
        tag_cluster_file: str | None = None,
        init_from: str | None = None,
        init_merge_lora: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["backbone", "pooler", "head", "loss", "guide"])
        self.grad_cache = GradCache(grad_cache_chunk_size) if grad_cache_chunk_size is not None else None
        self.automatic_optimization = self.grad_cache is None
        self.backbone = backbone
        self.pooler = pooler
        self.head = head if head is not None else IdentityHead()
        self.head.build(backbone.hidden_size)
        self.loss = loss if loss is not None else InfoNCE()
        tag_clusters = TagClusterMap.from_file(tag_cluster_file) if tag_cluster_file else None
        self.collate = PairCollator(backbone.collator(), tag_clusters)
        self.guide = guide.requires_grad_(False) if guide is not None else None
        self._evaluators: dict[str, list[Evaluator]] = {}
        #: metrics of the last test epoch, read by the report callback.
        self.test_results: dict[str, float] = {}
        self.init_trainable_from(init_from, merge_lora=init_merge_lora)

    def embed(self, inputs: dict[str, torch.Tensor], modality: str) -> torch.Tensor:
        """L2-normalised float32 embeddings of one side of a batch."""
        pooled = self.pooler(self.backbone(inputs))
        return F.normalize(self.head(pooled, modality).float(), dim=-1)

    def embed_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query and document embeddings of a batch (no documents: ``None``, e.g. classification)."""
        document = None if batch["document"] is None else self.embed(batch["document"], batch["document_modality"])
        return self.embed(batch["query"], batch["query_modality"]), document

    def batch_info(self, batch: dict[str, Any]) -> BatchInfo:
        """The collator's :class:`BatchInfo`, plus the guide's scores when there is a guide."""
        info = batch["info"]
        if self.guide is not None:
            # The guide scores captions against captions: the pairs' rows, every document's column.
            pairs = batch["query_index"].shape[0]
            info = dataclasses.replace(info, guide_scores=self.guide(batch["texts"])[:pairs].to(self.device))
        return info

    def training_loss(self, query: torch.Tensor, document: torch.Tensor, batch: dict[str, Any]) -> LossOutput:
        """The loss of a training batch.

        Non-finite embeddings (a NaN waveform, an overflow), which the loss refuses, reach it zeroed,
        and the NaN sum of the embeddings times 0 is added: the loss and every gradient it reaches are
        then NaN, so the step goes to the non-finite guard (:class:`callbacks.NonFiniteGuard`) like
        any other non-finite step, on every process at once. For finite embeddings both changes are
        exact no-ops, and no host synchronisation decides between two paths.
        """
        info = self.batch_info(batch)
        clean = [x.nan_to_num(0.0, 0.0, 0.0) for x in (query, document)]
        out = self.loss(*clean, info)
        return LossOutput(out.loss + 0.0 * (query.sum() + document.sum()), out.logs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        # A batch whose samples were all skipped as bad (on_bad_sample: skip) trains nothing: returning
        # None skips the optimiser step. With several processes this is only safe when every rank's
        # batch is empty at once: the other ranks' gradient reduction would wait for this one.
        if batch.get("empty"):
            return None
        if self.grad_cache is not None:
            sides = [(batch["query"], batch["query_modality"]), (batch["document"], batch["document_modality"])]
            out = self.grad_cache.step(self, self.embed, sides, lambda emb: self.training_loss(*emb, batch))
        else:
            out = self.training_loss(*self.embed_batch(batch), batch)
        size = batch["query_index"].shape[0]
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=size)
        self.log_dict({f"train/{k}": v for k, v in out.logs.items()}, batch_size=size)
        return out.loss if self.grad_cache is None else out.loss.detach()

    def evaluators(self, stage: str) -> list[Evaluator]:
        """The evaluation sets of the running ``val`` or ``test`` epoch, in loader order."""
        return self._evaluators.get(stage, [])

    def _eval_step(self, batch: dict[str, Any], stage: str, dataloader_idx: int) -> None:
        if batch.get("empty"):  # every sample of the batch was skipped as bad
            return
        query, document = self.embed_batch(batch)
        self.evaluators(stage)[dataloader_idx].update(query, document, batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val", dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test", dataloader_idx)

    def _start_evaluation(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self._evaluators[stage] = build_evaluators(datamodule, stage, self.device)

    def _finish_evaluation(self, stage: str) -> dict[str, float]:
        """Compute, log and return every set's metrics (``<stage>/<set>/...``) and their means."""
        values: dict[str, torch.Tensor] = {}
        for evaluator in self.evaluators(stage):
            texts = evaluator.extra_texts()  # hard-negative queries, class prompts
            extra = None
            if texts:
                with torch.no_grad():
                    extra = self._embed_texts(texts)
            values.update(evaluator.compute(stage, extra))
        values.update(mean_over_sets(values, stage))
        self._evaluators.pop(stage, None)
        # compute() already gathered every rank's embeddings: the values are global, not per rank.
        self.log_dict(values, sync_dist=False)
        return {k: float(v) for k, v in values.items()}

    def _embed_texts(self, texts: list[EmbedInput], batch_size: int = 32) -> torch.Tensor:
        """Document-side embeddings of an evaluator's extra texts, on every rank alike."""
        parts = []
        for begin in range(0, len(texts), batch_size):
            inputs = self.collate.backbone_collator(texts[begin : begin + batch_size])
            parts.append(self.embed(move_data_to_device(inputs, self.device), "text"))
        return torch.cat(parts)

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self._start_evaluation("test")

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self.test_results = self._finish_evaluation("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        if batch.get("empty"):  # every sample of the batch was skipped as bad: nothing to write
            return None
        query, document = self.embed_batch(batch)
        return {
            "query": query,
            "query_index": batch["query_index"],
            "document": document,
            "document_index": batch["document_index"],
            "clip_ids": batch["clip_ids"],
        }
