"""FSDP2 (``FSDP2Strategy``, which shards the module itself) on 2 gloo processes.

The runs come from ``tests/dist_scripts/train_tiny.py`` (see tests/test_ddp.py for the setup):
parameters are sharded DTensors, training gives DDP's losses, gradients and weights, a distributed
checkpoint resumes to the same losses, the trainable weights export as one consolidated file, and
GradCache, activation checkpointing and QLoRA compose with the sharding.
"""

import pytest
import torch
from safetensors import safe_open

from dist_scripts.launch import assert_close_tensors, assert_same_run, results


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    return results(tmp_path_factory)


@pytest.fixture(scope="module")
def runs(dist_results):
    return dist_results[0]


def test_parameters_are_sharded(runs):
    """Every parameter is a DTensor except the 0-d τ, which fully_shard cannot shard and which is
    kept whole on every rank (its gradient averaged by the module)."""
    replicated = [name for name, is_dtensor in runs["fsdp"]["dtensor"].items() if not is_dtensor]
    assert replicated == ["loss.temperature.log_scale"]
    assert "loss.temperature.log_scale" in runs["fsdp"]["grads"]


def test_fsdp_matches_ddp(runs):
    assert runs["fsdp"]["world"] == 2
    assert_same_run(runs["fsdp"], runs["ddp"])


def test_checkpoint_resumes_to_the_same_losses(dist_results):
    runs, out = dist_results
    checkpoint = out / "fsdp_checkpoints" / "epoch=0.ckpt"
    assert checkpoint.is_dir()  # Lightning's distributed checkpoint: one shard per rank + metadata
    assert {p.name for p in checkpoint.iterdir()} >= {"__0_0.distcp", "__1_0.distcp", "meta.pt", ".metadata"}
    # Resumed after epoch 0 (model, AdamW moments, LR schedule): epoch 1 repeats the uninterrupted run.
    torch.testing.assert_close(torch.tensor(runs["fsdp_resume"]["losses"]),
                               torch.tensor(runs["fsdp"]["losses"][2:]), rtol=1e-6, atol=0)
    assert_close_tensors(runs["fsdp_resume"]["weights"], runs["fsdp"]["weights"], rtol=1e-6)


def test_trainable_weights_export_one_consolidated_file(dist_results):
    runs, out = dist_results
    with safe_open(out / "fsdp" / "trainable.safetensors", framework="pt") as handle:
        exported = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    assert metadata["global_step"] == "4"
    # Full tensors of every trainable parameter, equal to the DDP run's weights.
    assert_close_tensors(exported, runs["ddp"]["weights"], rtol=2e-4)
    assert_close_tensors(exported, runs["fsdp"]["weights"], rtol=0)


def test_grad_cache_and_activation_checkpointing_compose_with_fsdp(runs):
    assert_same_run(runs["fsdp_grad_cache_checkpointing"], runs["ddp"])


def test_qlora_with_fsdp(runs):
    """The frozen NF4 weights stay whole on every rank (their quantisation state lives outside the
    tensor); everything else is sharded, and training equals the single-process QLoRA run."""
    replicated = [name for name, is_dtensor in runs["fsdp_qlora"]["dtensor"].items() if not is_dtensor]
    assert len(replicated) == 4 * 7 + 1  # 7 quantised linears per decoder layer, and τ
    assert all(name.endswith("proj.weight") or name.endswith("base_layer.weight") for name in replicated[:-1])
    assert_same_run(runs["fsdp_qlora"], runs["single_qlora"])
    assert runs["fsdp_qlora"]["losses"][-1] < runs["fsdp_qlora"]["losses"][0]
