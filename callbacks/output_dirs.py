"""Checks, before a fit starts, that its output folders can be written and have room."""

from __future__ import annotations

import os
import shutil
import tempfile

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_modules.weights import estimated_checkpoint_bytes


class OutputDirectoryError(OSError):
    """An output folder of the run cannot be created or written, or its disk is (nearly) full."""


def output_dirs(trainer: Trainer) -> list[str]:
    """The folders a fit writes to: the log directory, the checkpoint folders (Lightning's default
    ``<log_dir>/checkpoints`` for a ``ModelCheckpoint`` without ``dirpath``) and the ``dirpath`` of
    any other callback that has one."""
    log_dir = trainer.log_dir or trainer.default_root_dir
    folders = [log_dir]
    for callback in trainer.callbacks:
        folder = getattr(callback, "dirpath", None)
        if folder is None and isinstance(callback, ModelCheckpoint):
            folder = os.path.join(log_dir, "checkpoints")
        if isinstance(folder, (str, os.PathLike)):
            folders.append(os.fspath(folder))
    return list(dict.fromkeys(os.path.abspath(folder) for folder in folders))


def check_output_dirs(trainer: Trainer, model: LightningModule, min_free_gb: float) -> None:
    """Create every folder of :func:`output_dirs`, write and delete a probe file in it, and require
    ``min_free_gb`` GB plus one checkpoint's estimated size
    (:func:`~lightning_modules.weights.estimated_checkpoint_bytes`) free on its disk.

    Raises:
        OutputDirectoryError: naming the folder, before anything of the run has been written.
    """
    needed = min_free_gb * 1e9 + estimated_checkpoint_bytes(model)
    for folder in output_dirs(trainer):
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-") as probe:
                probe.write(b"probe")
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as err:
            raise OutputDirectoryError(f"output directory {folder} is not writable: {err}") from err
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise OutputDirectoryError(
                f"output directory {folder} has {free / 1e9:.2f} GB free; the run needs {needed / 1e9:.2f} GB "
                f"(min_free_gb={min_free_gb} plus {estimated_checkpoint_bytes(model) / 1e9:.2f} GB for a checkpoint)"
            )
