"""The LightningModule that turns a backbone into a retrieval embedding model."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch.optim.lr_scheduler import LambdaLR

from lightning_modules.backbones.base import Backbone
from lightning_modules.collate import PairCollator
from lightning_modules.grad_cache import RngState, split_inputs
from lightning_modules.heads import Head, IdentityHead
from lightning_modules.metrics import AudioTextRetrieval
from lightning_modules.poolers import Pooler
from losses.base import ContrastiveLoss, LossOutput
from losses.infonce import InfoNCE


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """LR multiplier: linear warm-up from 0 to 1, then cosine decay to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class EmbeddingModule(LightningModule):
    """Audio–text embedding model: backbone → pooler → head → L2 norm, trained contrastively.

    The parts are injected (each chosen by ``class_path`` in the YAML config), so a recipe is a
    choice of backbone, pooler, head and loss. Training embeds the query side (audio, or audio and
    question) and the document side (caption or answer) of each pair and applies the loss;
    validation and test embed every clip and all its captions and report retrieval metrics
    (``val/t2a/R@1`` ... ``test/a2t/mAP@10``, in percent).

    Args:
        backbone: the audio language model used as an encoder.
        pooler: how a sequence of hidden states becomes one vector.
        head: projection into the embedding space (input width taken from the backbone).
        loss: contrastive loss on the normalised query and document embeddings.
        learning_rate: peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to matrices only (not to biases, norms, τ).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps from 0 to ``learning_rate``.
        min_lr_ratio: final learning rate of the cosine decay as a fraction of the peak.
        grad_cache_chunk_size: embed the batch in chunks of this many items with GradCache (Gao
            et al., 2021): a large contrastive batch at the activation memory of one chunk, with
            the same gradients as the plain step. Uses manual optimisation, so the trainer's
            ``accumulate_grad_batches`` and ``gradient_clip_val`` must stay unset. ``None``: off.
    """

    def __init__(
        self,
        backbone: Backbone,
        pooler: Pooler,
        head: Head | None = None,
        loss: ContrastiveLoss | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        grad_cache_chunk_size: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "pooler", "head", "loss"])
        if grad_cache_chunk_size is not None and grad_cache_chunk_size < 1:
            raise ValueError(f"grad_cache_chunk_size must be positive, got {grad_cache_chunk_size}")
        self.automatic_optimization = grad_cache_chunk_size is None
        self.backbone = backbone
        self.pooler = pooler
        self.head = head if head is not None else IdentityHead()
        self.head.build(backbone.hidden_size)
        self.loss = loss if loss is not None else InfoNCE()
        self.collate = PairCollator(backbone.collator())
        self.val_metric = AudioTextRetrieval()
        self.test_metric = AudioTextRetrieval()
        #: metrics of the last test epoch, read by the report callback.
        self.test_results: dict[str, float] = {}

    def embed(self, inputs: dict[str, torch.Tensor], modality: str) -> torch.Tensor:
        """L2-normalised embeddings of one side of a batch."""
        pooled = self.pooler(self.backbone(inputs))
        return F.normalize(self.head(pooled, modality).float(), dim=-1)

    def embed_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed(batch["query"], batch["query_modality"]), self.embed(batch["document"], batch["document_modality"])

    def loss_structure(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Batch information the losses may use besides the embeddings."""
        return {
            "clip_ids": batch["query_index"],
            "texts": batch["texts"],
            "caption_kinds": batch["caption_kinds"],
        }

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if not self.automatic_optimization:
            return self.grad_cache_step(batch)
        query, document = self.embed_batch(batch)
        out = self.loss(query, document, **self.loss_structure(batch))
        self._log_train(out, query.shape[0])
        return out.loss

    def _log_train(self, out: LossOutput, batch_size: int) -> None:
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in out.logs.items()}, batch_size=batch_size)

    def grad_cache_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """One optimiser step with GradCache (manual optimisation)."""
        no_sync = getattr(self.trainer.strategy, "block_backward_sync", nullcontext)

        def backward(tensor: torch.Tensor, sync: bool) -> None:
            # Under DDP only the last backward of the step all-reduces the accumulated gradients.
            with nullcontext() if sync else no_sync():
                self.manual_backward(tensor)

        out = self.grad_cache_backward(batch, backward)
        optimizer = self.optimizers()
        optimizer.step()
        optimizer.zero_grad()
        self.lr_schedulers().step()
        self._log_train(out, batch["query_index"].shape[0])
        return out.loss.detach()

    def grad_cache_backward(
        self, batch: dict[str, Any], backward: Callable[[torch.Tensor, bool], None]
    ) -> LossOutput:
        """Accumulate the gradients of the full-batch loss chunk by chunk (Gao et al., 2021).

        1. Embed each side in chunks without a graph, remembering each chunk's RNG state.
        2. Compute the loss on the cached embeddings; backpropagate to them (and to τ).
        3. Re-embed each chunk with a graph under its remembered RNG state and backpropagate the
           cached embedding gradients through it.

        ``backward(tensor, sync)`` runs one backward pass; ``sync`` is true only for the last.
        """
        size = self.hparams.grad_cache_chunk_size
        sides = [("query", batch["query_modality"]), ("document", batch["document_modality"])]
        chunks = {side: split_inputs(batch[side], size) for side, _ in sides}
        states: dict[str, list[RngState]] = {side: [] for side, _ in sides}
        cached = {}
        with torch.no_grad():
            for side, modality in sides:
                parts = []
                for chunk in chunks[side]:
                    states[side].append(RngState.capture())
                    parts.append(self.embed(chunk, modality))
                cached[side] = torch.cat(parts).requires_grad_()
        out = self.loss(cached["query"], cached["document"], **self.loss_structure(batch))
        backward(out.loss, False)
        replays = [
            (chunk, state, grad, modality)
            for side, modality in sides
            for chunk, state, grad in zip(chunks[side], states[side], cached[side].grad.split(size))
        ]
        for i, (chunk, state, grad, modality) in enumerate(replays):
            state.restore()
            backward((self.embed(chunk, modality) * grad).sum(), i == len(replays) - 1)
        return out

    def _eval_step(self, batch: dict[str, Any], metric: AudioTextRetrieval) -> None:
        query, document = self.embed_batch(batch)
        metric.update(query, batch["query_index"], document, batch["document_index"], batch["document_key"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metric)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metric)

    def _log_metric(self, metric: AudioTextRetrieval, stage: str) -> dict[str, float]:
        values = {f"{stage}/{k}": v for k, v in metric.compute().items()}
        metric.reset()
        self.log_dict(values, sync_dist=False)
        return {k: float(v) for k, v in values.items()}

    def on_validation_epoch_end(self) -> None:
        self._log_metric(self.val_metric, "val")

    def on_test_epoch_end(self) -> None:
        self.test_results = self._log_metric(self.test_metric, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        query, document = self.embed_batch(batch)
        return {
            "query": query,
            "query_index": batch["query_index"],
            "document": document,
            "document_index": batch["document_index"],
            "clip_ids": batch["clip_ids"],
        }

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.learning_rate,
            betas=tuple(self.hparams.betas),
        )
        total = int(self.trainer.estimated_stepping_batches)
        schedule = warmup_cosine(self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"}}
