"""Shared fixtures: isolation between tests that start process groups in the pytest process
(ddp_spawn, strategies), and factory fixtures for the tiny models and data of ``tests/builders.py``."""

import os

import pytest
import torch.distributed as dist

import builders


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


@pytest.fixture
def tiny_qwen_backbone():
    """Factory: ``tiny_qwen_backbone(manual_seed=None, **overrides)`` → ``QwenOmniThinker(tiny=True, ...)``."""
    return builders.tiny_qwen_backbone


@pytest.fixture
def tiny_reranker_backbone():
    """Factory: the tiny thinker with its LM head and no ``<emb>`` token (the re-ranker's backbone)."""
    return builders.tiny_reranker_backbone


@pytest.fixture
def tiny_dasheng_backbone():
    """Factory: ``tiny_dasheng_backbone(manual_seed=None, **overrides)`` → ``MiDashengLMBackbone(tiny=True, ...)``."""
    return builders.tiny_dasheng_backbone


@pytest.fixture
def tiny_module():
    """Factory: ``tiny_module(kind="qwen", manual_seed=None, backbone=None, lora_b_std=None, **module_options)``
    → an ``EmbeddingModule`` on a tiny backbone (see ``builders.tiny_module``)."""
    return builders.tiny_module


@pytest.fixture
def synthetic_datamodule(tmp_path):
    """Factory: ``synthetic_datamodule(module=None, root=<tmp_path>/data, **overrides)`` → a small
    ``SyntheticDataModule`` bound to ``module`` when given."""

    def build(module=None, root=None, **overrides):
        return builders.synthetic_datamodule(root if root is not None else tmp_path / "data", module, **overrides)

    return build


@pytest.fixture
def quiet_trainer():
    """Factory: a CPU ``Trainer`` without logger, progress bar or model summary."""
    return builders.quiet_trainer
