"""Export of the trainable weights as one consolidated safetensors file."""

from __future__ import annotations

import os
from typing import Any

from lightning import Callback, LightningModule, Trainer
from safetensors.torch import save_file

from lightning_modules.weights import trainable_state_dict


class TrainableWeightsExport(Callback):
    """Writes every trainable parameter (LoRA adapters, head, τ, unfrozen towers) to one
    ``safetensors`` file at the end of ``fit``, and optionally whenever a checkpoint is saved.

    Under FSDP2 each rank holds a shard of every parameter: all ranks take part in gathering the
    full tensors (:func:`lightning_modules.weights.trainable_state_dict`) and rank 0 writes the
    file, so the export is the same whatever the strategy and the number of processes. Load it
    with :func:`lightning_modules.weights.load_trainable_state_dict`.

    Args:
        filename: name of the file.
        dirpath: folder of the file; ``None`` uses the trainer's ``log_dir`` (the logger's run
            directory, or ``default_root_dir`` without a logger).
        on_checkpoint: also export each time a checkpoint is saved (overwriting the file), so a
            crashed run leaves the weights of its last checkpoint.
    """

    def __init__(
        self, filename: str = "trainable.safetensors", dirpath: str | None = None, on_checkpoint: bool = False
    ) -> None:
        self.filename = filename
        self.dirpath = dirpath
        self.on_checkpoint = on_checkpoint
        #: path of the last file written (set on every rank).
        self.path: str | None = None

    def export(self, trainer: Trainer, pl_module: LightningModule) -> str:
        """Gather the trainable weights on all ranks, write them from rank 0; return the path."""
        state = trainable_state_dict(pl_module)  # collective under FSDP2: every rank must call it
        folder = self.dirpath or trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts
        path = os.path.join(folder, self.filename)
        if trainer.is_global_zero:
            os.makedirs(folder, exist_ok=True)
            metadata = {"epoch": str(trainer.current_epoch), "global_step": str(trainer.global_step)}
            save_file({name: tensor.contiguous() for name, tensor in state.items()}, path, metadata=metadata)
        trainer.strategy.barrier("trainable_weights_export")
        self.path = path
        return path

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.export(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.on_checkpoint:
            self.export(trainer, pl_module)
