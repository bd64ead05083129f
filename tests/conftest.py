"""Isolation between tests that start process groups in the pytest process (ddp_spawn, strategies)."""

import os

import pytest
import torch.distributed as dist


@pytest.fixture(autouse=True)
def restore_distributed_environment():
    # Lightning writes MASTER_ADDR/MASTER_PORT/WORLD_SIZE/... into os.environ and may leave a process
    # group behind; a later test that launches its own ranks must not inherit either.
    environ = dict(os.environ)
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)
