"""What every trainable model of the project shares: the optimiser and schedule, slim checkpoints of the
trainable weights, and starting from an earlier run's weights."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning import LightningModule
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from lightning_modules.weights import (
    check_checkpoint_state,
    checkpoint_keys,
    load_trainable_state_dict,
    lora_scalings,
    merge_lora_into,
    read_trainable_weights,
)


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """LR multiplier: linear warm-up from 0 to 1, then cosine decay to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class FineTuneModule(LightningModule):
    """Base of the project's LightningModules (:class:`~lightning_modules.EmbeddingModule`,
    :class:`~lightning_modules.RerankModule`): parameter-efficient fine-tuning of a large backbone.

    - **Optimiser**: AdamW over the trainable parameters, weight decay on matrices only (not on
      biases, norms, τ), linear warm-up then cosine decay, stepped per optimiser step.
    - **Checkpoints** hold the trainable weights and the buffers, not the frozen base weights
      (rebuilding the model from its config restores those; see
      :func:`lightning_modules.weights.checkpoint_keys`), so loading is not strict, and
      :meth:`on_load_checkpoint` checks instead that every trainable weight is there. FSDP2's sharded
      checkpoints keep the full state: Lightning's distributed loader needs every key.
    - **init_from**: subclasses call :meth:`init_trainable_from` at the end of their constructor:
      the earlier run's trainable weights as they are, or its LoRA merged into the base weights.

    The rest of the training machinery is shared outside the module: the non-finite guard and the
    RNG state are callbacks (:mod:`callbacks.nonfinite`, :mod:`callbacks.rng_state`), FSDP2 sharding
    is the strategy (:class:`~lightning_modules.strategies.FSDP2Strategy`), GradCache is one class
    (:class:`~lightning_modules.grad_cache.GradCache`).

    Args:
        learning_rate: peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to matrices only.
        betas: AdamW betas.
        warmup_steps: linear warm-up steps from 0 to ``learning_rate``; a float in (0, 1) is a
            fraction of the run's optimiser steps (AuroLA: 0.03).
        min_lr_ratio: final learning rate of the cosine decay as a fraction of the peak.
    """

    def __init__(
        self,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int | float = 0,
        min_lr_ratio: float = 0.0,
    ):
        super().__init__()
        if isinstance(warmup_steps, float) and not 0 <= warmup_steps < 1:
            raise ValueError(f"a fractional warmup_steps must be in [0, 1), got {warmup_steps}")
        self.optim_settings = dict(lr=learning_rate, weight_decay=weight_decay, betas=tuple(betas),
                                   warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
        # Checkpoints leave the frozen weights out; on_load_checkpoint checks the trainable ones.
        self.strict_loading = False

    def init_trainable_from(self, path: str | None, merge_lora: bool = False) -> None:
        """Start from the trainable weights of an earlier run: a ``.safetensors`` file of trainable
        weights or a Lightning ``.ckpt``. Every trainable parameter must be present with the same
        shape; frozen weights come from the backbone's own checkpoint.

        With ``merge_lora`` (a ``.ckpt`` only) the earlier run's LoRA updates are merged into this
        model's base weights (:func:`~lightning_modules.weights.merge_lora_into`) and this model's
        own adapters start fresh, of any rank; the earlier run's other weights (a head, τ) are
        copied where this model has them with the same shape, buffers come from this model's config.
        """
        if path is None:
            return
        if not merge_lora:
            load_trainable_state_dict(self, read_trainable_weights(path, self), source=path)
            return
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if "lora_scaling" not in checkpoint:
            raise ValueError(f"{path}: merging needs a Lightning checkpoint of this project that records its LoRA scaling")
        rest = merge_lora_into(self, checkpoint["state_dict"], checkpoint["lora_scaling"], path)
        params = dict(self.named_parameters())
        buffers = {name for name, _ in self.named_buffers()}
        unknown = sorted(key for key in rest if key not in params and key not in buffers)
        wrong = sorted(key for key in rest if key in params and tuple(rest[key].shape) != tuple(params[key].shape))
        if unknown or wrong:
            raise ValueError(f"{path} does not fit the model: unknown weights {unknown[:20]}, wrong shape {wrong[:20]}")
        with torch.no_grad():
            for key in rest.keys() & params.keys():
                params[key].copy_(rest[key].to(dtype=params[key].dtype, device=params[key].device))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What merging this run's adapters into a later stage's base weights needs (init_from).
        checkpoint["lora_scaling"] = lora_scalings(self)
        weights = checkpoint["state_dict"]
        if not any(isinstance(tensor, DTensor) for tensor in weights.values()):
            keep = checkpoint_keys(self)
            checkpoint["state_dict"] = {key: tensor for key, tensor in weights.items() if key in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A sharded checkpoint has no "state_dict" here: Lightning's distributed loader, which needs
        # every key, has already read it into the model.
        if "state_dict" in checkpoint:
            check_checkpoint_state(self, checkpoint["state_dict"], "the checkpoint")

    def configure_optimizers(self):
        settings = self.optim_settings
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": settings["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=settings["lr"],
            betas=settings["betas"],
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = settings["warmup_steps"]
        warmup = round(warmup * total) if isinstance(warmup, float) else warmup
        schedule = warmup_cosine(warmup, total, settings["min_lr_ratio"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"}}
