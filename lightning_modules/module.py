"""The LightningModule that turns a backbone into a retrieval embedding model."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning import LightningModule
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from lightning_modules.adapters import quantized_parameters
from lightning_modules.backbones.base import Backbone
from lightning_modules.collate import PairCollator
from lightning_modules.evaluation import Evaluator, build_evaluators, mean_over_sets
from lightning_modules.grad_cache import RngState, split_inputs
from lightning_modules.guide import TextGuide
from lightning_modules.heads import Head, IdentityHead
from lightning_modules.inputs import EmbedInput
from lightning_modules.poolers import Pooler
from lightning_modules.rng import capture_rng_state, restore_rng_state
from lightning_modules.weights import (
    check_checkpoint_state,
    checkpoint_keys,
    load_trainable_state_dict,
    read_trainable_weights,
)
from losses.base import ContrastiveLoss, LossOutput
from losses.infonce import InfoNCE
from losses.tag_clusters import TagClusterMap

log = logging.getLogger(__name__)


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """LR multiplier: linear warm-up from 0 to 1, then cosine decay to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def average_gradients(params: list[torch.nn.Parameter], group: dist.ProcessGroup) -> None:
    """Replace each parameter's gradient by its mean over the processes of ``group``.

    A process whose backward never reached a parameter contributes zeros, so that every process
    issues the same collectives.
    """
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    pending = [dist.all_reduce(param.grad, group=group, async_op=True) for param in params]
    for work in pending:
        work.wait()
    world = dist.get_world_size(group)
    for param in params:
        param.grad.div_(world)


class EmbeddingModule(LightningModule):
    """Audio–text embedding model: backbone → pooler → head → L2 norm, trained contrastively.

    The parts are injected (each chosen by ``class_path`` in the YAML config), so a recipe is a
    choice of backbone, pooler, head and loss. Training embeds the query side (audio, or audio and
    question) and the document side (caption or answer) of each pair and applies the loss;
    validation and test embed every clip and all its captions and report the metrics of each
    evaluation set the data module declares (``eval_sets``; see :mod:`lightning_modules.evaluation`):
    ``val/t2a/R@1`` ... ``test/a2t/mAP@10`` (in percent) for one unnamed set, and
    ``test/<set>/<metric>`` plus the mean over the audio–text sets (``test/t2a/R@1``) for named ones.

    Checkpoints hold the trainable weights and the buffers, not the frozen base weights (rebuilding
    the model from its config restores those; see :func:`lightning_modules.weights.checkpoint_keys`),
    so loading is not strict, and :meth:`on_load_checkpoint` checks instead that every trainable
    weight is there. They also hold every process's random states (Python, NumPy, torch CPU and
    CUDA), put back when the resumed training starts: with Lightning's loop and optimiser state
    and the data module's mid-epoch restart, a resumed run repeats the uninterrupted one exactly.
    FSDP2's sharded checkpoints keep the full state: Lightning's distributed loader needs every key.

    A step whose loss or gradient is not finite (``nonfinite``) is skipped as a whole: the
    gradients are dropped before the optimiser sees them, so neither the weights nor AdamW's moments
    and step count change; the skips are counted in ``train/nonfinite_skipped``. Every process takes
    the same decision. Under ``16-mixed`` precision the gradient check is left to the GradScaler,
    which skips overflowing steps itself (an overflow is routine there, not an error).

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
        guide: frozen text scorer whose caption×caption similarities are passed to the loss as
            ``guide_scores`` (for :class:`losses.GuideModelMasker`); ``None``: no guide.
        tag_cluster_file: AuroLA-style ``{tag: {"cluster_index": int | null}}`` JSON grouping
            synonymous tags, for tag-cluster positives (Hybrid-NCE); without it every tag is its
            own cluster.
        init_from: start from the trainable weights of an earlier run (e.g. ALM2Vec stage 1 →
            stage 2): a ``.safetensors`` file of trainable weights or a Lightning ``.ckpt``. Every
            trainable parameter must be present with the same shape; frozen weights come from
            the backbone's own checkpoint.
        nonfinite: what a non-finite loss or gradient does: ``"skip"`` leaves out that optimiser
            step (logged, and counted in ``train/nonfinite_skipped``); ``"error"`` stops training
            with an error naming the step and the batch's clip ids.
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
        guide: TextGuide | None = None,
        tag_cluster_file: str | None = None,
        init_from: str | None = None,
        nonfinite: Literal["skip", "error"] = "skip",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "pooler", "head", "loss", "guide"])
        if grad_cache_chunk_size is not None and grad_cache_chunk_size < 1:
            raise ValueError(f"grad_cache_chunk_size must be positive, got {grad_cache_chunk_size}")
        if nonfinite not in ("skip", "error"):
            raise ValueError(f"nonfinite must be 'skip' or 'error', got {nonfinite!r}")
        # Checkpoints leave the frozen weights out; on_load_checkpoint checks the trainable ones.
        self.strict_loading = False
        self.automatic_optimization = grad_cache_chunk_size is None
        self.backbone = backbone
        self.pooler = pooler
        self.head = head if head is not None else IdentityHead()
        self.head.build(backbone.hidden_size)
        self.loss = loss if loss is not None else InfoNCE()
        self.collate = PairCollator(backbone.collator())
        self.guide = guide.requires_grad_(False) if guide is not None else None
        self.tag_clusters = TagClusterMap.from_file(tag_cluster_file) if tag_cluster_file else TagClusterMap({})
        self._evaluators: dict[str, list[Evaluator]] = {}
        #: metrics of the last test epoch, read by the report callback.
        self.test_results: dict[str, float] = {}
        #: optimiser steps skipped for a non-finite loss or gradient (kept in checkpoints).
        self.nonfinite_skipped = 0
        # (clip ids, loss) of the batches since the last optimiser step, for the non-finite check.
        self._step_losses: list[tuple[list[str], torch.Tensor]] = []
        # every process's random states from a loaded checkpoint, put back when training starts.
        self._rng_states_to_restore: list[dict[str, Any]] | None = None
        if init_from is not None:
            load_trainable_state_dict(self, read_trainable_weights(init_from, self), source=init_from)

    def configure_model(self) -> None:
        """Shard the model with FSDP2 (``torch.distributed.fsdp.fully_shard``) when the strategy
        provides a device mesh (Lightning's ``ModelParallelStrategy``, e.g. ``configs/strategy/fsdp.yaml``);
        under any other strategy, do nothing.

        Each block the backbone lists in :meth:`Backbone.shard_units` (decoder layers, audio-encoder
        blocks) becomes its own unit, so only one block's full weights exist at a time; then every
        child with parameters (backbone, head, loss) becomes a root unit for the rest (embeddings,
        norms, projector, head). The module itself is not sharded: Lightning calls
        ``training_step`` directly, and FSDP2 gathers a unit's weights in its ``forward`` hooks.
        Parameters are sharded over the mesh's ``data_parallel`` dimension (Zhao et al., "PyTorch
        FSDP", VLDB 2023; https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html).

        Two kinds of parameters stay whole on every rank: 0-d ones (the learnable τ), which
        ``fully_shard`` refuses, and bitsandbytes 4-bit weights, whose quantisation state lives
        outside the tensor and would not survive sharding. The trainable ones among them are
        averaged over the ranks in :meth:`on_before_optimizer_step`.
        """
        mesh = self._data_parallel_mesh()
        # Lightning calls this hook again for every later stage (e.g. test after fit).
        if mesh is None or isinstance(self.backbone, FSDPModule):
            return
        replicated = quantized_parameters(self) | {param for param in self.parameters() if param.ndim == 0}
        for unit in self.backbone.shard_units():
            fully_shard(unit, mesh=mesh, ignored_params=replicated)
        for child in self.children():
            if any(param not in replicated for param in child.parameters()):
                fully_shard(child, mesh=mesh, ignored_params=replicated)

    def _data_parallel_mesh(self) -> DeviceMesh | None:
        """The mesh FSDP2 shards over, or ``None`` when the strategy provides no device mesh."""
        mesh = self.device_mesh
        if mesh is None:
            return None
        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError("EmbeddingModule shards with FSDP2 only: set the strategy's tensor_parallel_size to 1")
        return mesh["data_parallel"] if "data_parallel" in names else mesh

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # FSDP2 reduces the gradients of the parameters it shards; the replicated ones (see
        # configure_model) are plain tensors, averaged here as DDP would.
        if isinstance(self.backbone, FSDPModule):
            replicated = [p for p in self.parameters() if p.requires_grad and not isinstance(p, DTensor)]
            average_gradients(replicated, self._data_parallel_mesh().get_group())
        self._guard_nonfinite()

    def _guard_nonfinite(self) -> None:
        """Skip the coming optimiser step, or raise, if a loss or a gradient is not finite.

        Lightning calls ``on_before_optimizer_step`` on both optimisation paths (inside
        ``optimizer.step()`` for GradCache's manual one) once the gradients are complete and
        reduced, before clipping and the update. Dropping the gradients skips the step: AdamW
        leaves a parameter without gradient untouched, its moments and step count included.
        """
        losses, self._step_losses = self._step_losses, []
        loss_ok = bool(torch.stack([torch.isfinite(loss).all() for _, loss in losses]).all()) if losses else True
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in self.parameters()]
        grads = [grad for grad in grads if grad is not None]
        # A GradScaler (16-mixed) skips overflowing steps itself, and lowers its scale.
        if grads and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            grads_ok = bool(torch.stack([torch.isfinite(grad).all() for grad in grads]).all())
        else:
            grads_ok = True
        if self.trainer.strategy.reduce_boolean_decision(loss_ok and grads_ok, all=True):
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))
            return
        found = [name for name, ok in (("loss", loss_ok), ("gradients", grads_ok)) if not ok]
        what = " and ".join(found) or "values on another process"
        clip_ids = [clip_id for ids, _ in losses for clip_id in ids]
        where = f"global step {self.global_step} (epoch {self.current_epoch})"
        if self.hparams.nonfinite == "error":
            raise FloatingPointError(f"non-finite {what} at {where}; clip ids of this process's batch: {clip_ids}")
        for param in self.parameters():
            param.grad = None
        self.nonfinite_skipped += 1
        log.warning("non-finite %s at %s: optimiser step skipped (%d so far); clip ids of this process's batch: %s",
                    what, where, self.nonfinite_skipped, clip_ids)
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every process calls this while a checkpoint is written, so the states can be gathered here.
        state = capture_rng_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint["rng_states"] = states
        checkpoint["nonfinite_skipped"] = self.nonfinite_skipped
        weights = checkpoint["state_dict"]
        if not any(isinstance(tensor, DTensor) for tensor in weights.values()):
            keep = checkpoint_keys(self)
            checkpoint["state_dict"] = {key: tensor for key, tensor in weights.items() if key in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A sharded checkpoint has no "state_dict" here: Lightning's distributed loader, which needs
        # every key, has already read it into the model.
        if "state_dict" in checkpoint:
            check_checkpoint_state(self, checkpoint["state_dict"], "the checkpoint")
        self.nonfinite_skipped = checkpoint.get("nonfinite_skipped", 0)
        self._rng_states_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        # Not at loading time: Lightning builds the train loader's iterator and runs the sanity check
        # in between. Here the next random draw is the resumed step's first, as in the original run.
        states, self._rng_states_to_restore = self._rng_states_to_restore, None
        if states is None or self.trainer.ckpt_path is None:  # not a fit resumed from that checkpoint
            return
        if len(states) == self.trainer.world_size:
            restore_rng_state(states[self.global_rank])
        else:
            rank_zero_warn(
                f"the checkpoint holds the random states of {len(states)} processes, this run has "
                f"{self.trainer.world_size}: they are not restored, so dropout draws differ from the original run"
            )

    def embed(self, inputs: dict[str, torch.Tensor], modality: str) -> torch.Tensor:
        """L2-normalised embeddings of one side of a batch."""
        pooled = self.pooler(self.backbone(inputs))
        return F.normalize(self.head(pooled, modality).float(), dim=-1)

    def embed_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query and document embeddings of a batch (no documents: ``None``, e.g. classification)."""
        document = None if batch["document"] is None else self.embed(batch["document"], batch["document_modality"])
        return self.embed(batch["query"], batch["query_modality"]), document

    def loss_structure(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Batch information the losses may use besides the embeddings."""
        structure = {
            "clip_ids": batch["query_index"],
            "texts": batch["texts"],
            "caption_kinds": batch["caption_kinds"],
            "tag_clusters": [self.tag_clusters.clusters_for(tags) for tags in batch["tags"]],
        }
        if self.guide is not None:
            structure["guide_scores"] = self.guide(batch["texts"]).to(self.device)
        return structure

    def training_loss(self, query: torch.Tensor, document: torch.Tensor, batch: dict[str, Any]) -> LossOutput:
        """The loss of a training batch.

        Non-finite embeddings, which the loss refuses, give a NaN loss instead, computed on the
        embeddings with their non-finite values zeroed plus the NaN sum of the embeddings times 0:
        its backward reaches every weight the loss does, with NaN gradients, so the step goes to the
        non-finite guard (``nonfinite``) like any other non-finite step, on every process at once.
        """
        structure = self.loss_structure(batch)
        if bool(torch.isfinite(query).all() & torch.isfinite(document).all()):
            return self.loss(query, document, **structure)
        out = self.loss(query.nan_to_num(0.0, 0.0, 0.0), document.nan_to_num(0.0, 0.0, 0.0), **structure)
        return LossOutput(out.loss + 0.0 * (query.sum() + document.sum()), out.logs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        # A batch whose samples were all skipped as bad (on_bad_sample: skip) trains nothing: returning
        # None skips the optimiser step. With several processes this is only safe when every rank's
        # batch is empty at once: the other ranks' gradient reduction would wait for this one.
        if batch.get("empty"):
            return None
        if not self.automatic_optimization:
            return self.grad_cache_step(batch)
        query, document = self.embed_batch(batch)
        out = self.training_loss(query, document, batch)
        self._log_train(out, query.shape[0])
        self._step_losses.append((batch["clip_ids"], out.loss.detach()))
        return out.loss

    def _log_train(self, out: LossOutput, batch_size: int) -> None:
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in out.logs.items()}, batch_size=batch_size)

    def grad_cache_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """One optimiser step with GradCache (manual optimisation).

        Under DDP every backward pass runs without the reducer, and the gradients are averaged over
        the processes once, after the last pass. DDP's reducer expects each backward to reach every
        trainable parameter, but GradCache's last pass (the last document chunk) reaches neither the
        audio tower nor τ: letting the reducer run on it left its buckets unfinished, and the next
        step failed ("parameters that were not used in producing the loss") after an optimiser step
        on unsynchronised gradients.
        """
        no_sync = getattr(self.trainer.strategy, "block_backward_sync", nullcontext)

        def backward(tensor: torch.Tensor, last: bool) -> None:
            self.manual_backward(tensor)
            if last:
                self._average_ddp_gradients()

        with no_sync():
            out = self.grad_cache_backward(batch, backward)
        self._step_losses.append((batch["clip_ids"], out.loss.detach()))
        optimizer = self.optimizers()
        optimizer.step()
        optimizer.zero_grad()
        self.lr_schedulers().step()
        self._log_train(out, batch["query_index"].shape[0])
        return out.loss.detach()

    def _average_ddp_gradients(self) -> None:
        """Average the gradients over DDP's processes, as its reducer would."""
        model = self.trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            average_gradients([p for p in self.parameters() if p.requires_grad], model.process_group)

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
        out = self.training_loss(cached["query"], cached["document"], batch)
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
