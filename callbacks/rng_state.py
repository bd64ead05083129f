"""The process-global random states in checkpoints: capture/restore, and the callback that does it.

Dropout masks (and GradCache's per-chunk replays, which capture the global torch state) are drawn
from the global generators, so an exact resume needs them as they were when the checkpoint was
written. The states are kept as tensors and plain Python values only, so a checkpoint holding them
still loads with ``torch.load(weights_only=True)`` (NumPy's state is an ``ndarray`` tuple, which
the restricted unpickler refuses).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


def capture_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and (once initialised) current-CUDA-device states."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_initialized():
        # Only the current device: asking for every device would create a context on each of them.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global generators to a state from :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RngStateCheckpoint(Callback):
    """Saves every process's random states in checkpoints and puts them back when a resumed fit
    starts, so a resumed run draws the same dropout masks (and GradCache replays) as the
    uninterrupted one.

    With Lightning's loop and optimiser state and the data module's mid-epoch restart
    (:mod:`datamodules.resume`), a run resumed from a checkpoint then repeats the uninterrupted run
    exactly. Always on in the CLI; works with any LightningModule.

    The states go in ``checkpoint["rng_states"]``, one per process (gathered from every rank while the
    checkpoint is written). They are restored in ``on_train_start``, not at loading time: Lightning
    builds the train loader's iterator and runs the sanity check in between, so only there is the next
    random draw the resumed step's first, as in the original run. A checkpoint written by a different
    number of processes restores nothing (with a warning).
    """

    def __init__(self) -> None:
        self._to_restore: list[dict[str, Any]] | None = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Every process runs this hook while a checkpoint is written, so the states can be gathered here.
        state = capture_rng_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._to_restore = checkpoint.get("rng_states")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        states, self._to_restore = self._to_restore, None
        if states is None or trainer.ckpt_path is None:  # not a fit resumed from that checkpoint
            return
        if len(states) == trainer.world_size:
            restore_rng_state(states[trainer.global_rank])
        else:
            rank_zero_warn(
                f"the checkpoint holds the random states of {len(states)} processes, this run has "
                f"{trainer.world_size}: they are not restored, so dropout draws differ from the original run"
            )
