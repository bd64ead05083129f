"""Runs ``train_tiny.py`` once per test session (the distributed runs on 2 gloo processes with
torchrun, the single-process references in one plain process) and compares runs. Test modules
share the results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("train_tiny.py")
DISTRIBUTED_RUNS = ["ddp", "ddp_local", "ddp_grad_cache", "fsdp", "fsdp_resume", "fsdp_grad_cache_checkpointing",
                    "fsdp_qlora"]
SINGLE_RUNS = ["single", "single_qlora"]
#: the runs on one CUDA device (tests/test_gpu.py): references first, then FSDP2 over a 1-device mesh.
CUDA_RUNS = ["single", "single_qlora", "fsdp", "fsdp_resume", "fsdp_qlora"]
#: a guard against a deadlocked collective hanging the test session, far above the normal time.
GUARD_SECONDS = 1800

_cache: dict[str, tuple[dict[str, dict], Path]] = {}


def _run(command: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=GUARD_SECONDS)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}")


def results(tmp_path_factory) -> tuple[dict[str, dict], Path]:
    """``{run name: what train_tiny.py saved}`` and the output folder (checkpoints, exports)."""
    if "runs" not in _cache:
        out = tmp_path_factory.mktemp("dist_runs")
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              str(SCRIPT), str(out), *DISTRIBUTED_RUNS])
        _run([sys.executable, str(SCRIPT), str(out), *SINGLE_RUNS])
        runs = {name: torch.load(out / f"{name}.pt", weights_only=False) for name in DISTRIBUTED_RUNS + SINGLE_RUNS}
        _cache["runs"] = (runs, out)
    return _cache["runs"]


def cuda_results(tmp_path_factory) -> tuple[dict[str, dict], Path]:
    """Like :func:`results`, for :data:`CUDA_RUNS` in one process on one CUDA device."""
    if "cuda" not in _cache:
        out = tmp_path_factory.mktemp("cuda_runs")
        _run([sys.executable, str(SCRIPT), str(out), *CUDA_RUNS, "--accelerator", "gpu"])
        _cache["cuda"] = ({name: torch.load(out / f"{name}.pt", weights_only=False) for name in CUDA_RUNS}, out)
    return _cache["cuda"]


def assert_close_tensors(got: dict, want: dict, rtol: float) -> None:
    """Same names; each tensor within ``rtol`` × the largest magnitude of its reference."""
    assert got.keys() == want.keys()
    for name in want:
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=rtol * max(scale, 1e-12), msg=name)


def assert_same_run(got: dict, want: dict) -> None:
    """Same losses at every step, same first-step gradients and same final trainable weights."""
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-5, atol=0)
    assert_close_tensors(got["grads"], want["grads"], rtol=1e-5)
    assert_close_tensors(got["weights"], want["weights"], rtol=2e-4)
