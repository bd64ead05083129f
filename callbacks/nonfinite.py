"""Skip (or stop at) an optimiser step whose loss or gradients are not finite."""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from lightning import Callback, LightningModule, Trainer
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)


class NonFiniteGuard(Callback):
    """An optimiser step whose loss or gradient is not finite is left out as a whole, or stops the run.

    The guard watches every tensor a backward pass starts from (``on_before_backward``: the loss, or
    GradCache's partial products) and, once the gradients are complete and reduced
    (``on_before_optimizer_step``, which Lightning calls on both the automatic and the manual
    optimisation path, before clipping and the update), every gradient. Skipping drops the gradients
    before the optimiser sees them: AdamW leaves a parameter without gradient untouched, its moments
    and step count included, so neither the weights nor the optimiser state change. Every process
    takes the same decision (one boolean reduction). Under ``16-mixed`` precision the gradient check
    is left to the GradScaler, which skips overflowing steps itself (an overflow is routine there).

    The number of skipped steps is logged as ``train/nonfinite_skipped`` and kept in checkpoints.
    Works with any LightningModule; the clip ids of the offending batches are named when the batch
    is a dict with ``clip_ids``. Always on in the CLI (``--nonfinite.mode``).

    Args:
        mode: ``"skip"`` leaves out the step (logged with the batch's clip ids); ``"error"`` raises
            ``FloatingPointError`` naming the step and the clip ids.
    """

    def __init__(self, mode: Literal["skip", "error"] = "skip") -> None:
        if mode not in ("skip", "error"):
            raise ValueError(f"nonfinite mode must be 'skip' or 'error', got {mode!r}")
        self.mode = mode
        #: optimiser steps skipped so far (kept in checkpoints).
        self.skipped = 0
        # Since the last optimiser step: finiteness of each backward's start tensor, and the clip ids.
        self._finite: list[torch.Tensor] = []
        self._clip_ids: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, dict):
            self._clip_ids.extend(batch.get("clip_ids", []))

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self._finite.append(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        finite, self._finite = self._finite, []
        clip_ids, self._clip_ids = self._clip_ids, []
        loss_ok = torch.stack(finite).all() if finite else torch.tensor(True)
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in pl_module.parameters()]
        grads = [grad for grad in grads if grad is not None]
        # A GradScaler (16-mixed) skips overflowing steps itself, and lowers its scale.
        if grads and getattr(trainer.precision_plugin, "scaler", None) is None:
            grads_ok = torch.stack([torch.isfinite(grad).all() for grad in grads]).all()
        else:
            grads_ok = torch.tensor(True)
        # One host transfer for both checks (this is the step's only synchronisation).
        loss_ok, grads_ok = torch.stack([loss_ok.to(grads_ok.device), grads_ok]).tolist()
        if trainer.strategy.reduce_boolean_decision(loss_ok and grads_ok, all=True):
            pl_module.log("train/nonfinite_skipped", float(self.skipped))
            return
        found = [name for name, ok in (("loss", loss_ok), ("gradients", grads_ok)) if not ok]
        what = " and ".join(found) or "values on another process"
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch})"
        if self.mode == "error":
            raise FloatingPointError(f"non-finite {what} at {where}; clip ids of this process's batch: {clip_ids}")
        for param in pl_module.parameters():
            param.grad = None
        self.skipped += 1
        log.warning("non-finite %s at %s: optimiser step skipped (%d so far); clip ids of this process's batch: %s",
                    what, where, self.skipped, clip_ids)
        pl_module.log("train/nonfinite_skipped", float(self.skipped))
