"""The process-global random states, in a form a checkpoint can carry.

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
