"""DDP on 2 gloo processes equals one process on the whole global batch, with and without GradCache.

The runs come from ``tests/dist_scripts/train_tiny.py``: the tiny thinker with LoRA, a linear head
and InfoNCE with a learnable τ, 2 epochs × 2 steps of AdamW on a global batch of 8 pairs (4 per
process). Rank r's local batch is rows [4r, 4r + 4) of the single process's batch, so the runs see
the same data. The first step's gradients are compared after DDP's averaging, read in
``on_before_optimizer_step``; the losses of every step and the final weights check the steps that
follow. Tolerances are relative to each tensor's scale: float32 sums in another order, and four
AdamW steps amplify that a little.
"""

import pytest

from dist_scripts.launch import assert_same_run, results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return results(tmp_path_factory)[0]


@pytest.mark.parametrize("run", ["ddp", "ddp_local"])
def test_ddp_matches_single_process_big_batch(runs, run):
    """gather="global" (every process scores all 8×8 pairs) and "local" (each process's anchors
    against all candidates; the processes' mean loss is the global loss)."""
    assert runs[run]["world"] == 2 and runs["single"]["world"] == 1
    assert any("lora_A" in name for name in runs[run]["grads"])
    assert any("audio_tower" in name for name in runs[run]["grads"])
    assert_same_run(runs[run], runs["single"])


def test_grad_cache_under_ddp_matches_plain_ddp(runs):
    """GradCache with chunks of 3 (3 + 1 per process and side) gives DDP's gradients and losses.

    The trainable audio tower is reached only by query chunks and τ only by the loss, so the last
    backward of a step (the last document chunk) misses both: what broke DDP's reducer before
    grad_cache_step averaged the gradients itself."""
    assert_same_run(runs["ddp_grad_cache"], runs["ddp"])


def test_losses_decrease(runs):
    losses = runs["ddp"]["losses"]
    assert losses[-1] < losses[0]
