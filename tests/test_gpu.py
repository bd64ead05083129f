"""Training on one CUDA device (``pytest -m gpu``): what the CPU tests cannot show.

- a ``bf16-mixed`` fit step of each tiny backbone, against the float32 loss of the same weights;
- QLoRA: bitsandbytes NF4 kernels on the device, frozen 4-bit weights, a loss that goes down;
- GradCache (``grad_cache_chunk_size``) gives the plain step's gradients and weights;
- the CUDA generator state in checkpoints: a killed run resumes to the uninterrupted weights;
- FSDP2 over a one-device mesh with NCCL (plain, resumed from its sharded checkpoint, QLoRA)
  equals the single-device run.

The references are the same runs without the feature under test (plain step, single device,
float32), on the same device. TF32 is off for these tests so that float32 means float32.
"""

from __future__ import annotations

import copy
import math
import os
import signal

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from lightning import Trainer
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader

from dist_scripts.launch import assert_close_tensors, assert_same_run, cuda_results
from dist_scripts.resume_run import (
    data_root,
    finish,
    last_checkpoint,
    log_of,
    reference_weights,
    run,
    wait_until_waiting,
)
from builders import tiny_module, trainable_parts
from dist_scripts.train_tiny import Record, examples, make_module
from lightning_modules.adapters import LoraSettings
from callbacks.rng_state import capture_rng_state, restore_rng_state
from lightning_modules.weights import trainable_state_dict
from test_precision import module as precision_module
from test_qlora import base_layers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

#: main.py options of the CUDA resume runs: deterministic kernels (warn where none exists), so that
#: the resumed run can repeat the uninterrupted one bit for bit.
CUDA_CLI = ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.deterministic", "warn"]


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cuda_trainer(**options) -> Trainer:
    return Trainer(accelerator="gpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, **options)


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A bitsandbytes 4-bit weight as a plain CPU tensor (``Params4bit.to`` would move its shared
    quantisation state along)."""
    return tensor.detach().as_subclass(torch.Tensor).cpu()


@pytest.mark.parametrize("kind", ["qwen", "midashenglm"])
def test_bf16_mixed_fit_step(kind):
    """One Trainer step under ``bf16-mixed``: the loss is finite and within 10 % of the float32 loss
    of the same weights and batch (bf16 matmuls in the backbone; on CPU the gap is 0.6-2.4 %), and
    every adapter, the head and τ move while staying float32 on the device."""
    model = precision_module(kind, gradient_checkpointing=True)
    batch = model.collate(examples()[:4])
    device = torch.device("cuda")
    reference = copy.deepcopy(model).to(device).train()
    on_device = move_data_to_device(batch, device)
    with torch.no_grad():
        expected = float(reference.loss(*reference.embed_batch(on_device), reference.batch_info(on_device)).loss)
    del reference
    trainable = [n for n, p in model.named_parameters() if "lora_" in n or n.startswith(("head.", "loss."))]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}
    record = Record()
    cuda_trainer(precision="bf16-mixed", max_steps=1, callbacks=[record]).fit(model, DataLoader([batch], batch_size=None))
    assert math.isfinite(record.losses[0])
    assert record.losses[0] == pytest.approx(expected, rel=0.1)
    after = dict(model.named_parameters())
    assert "loss.temperature.log_scale" in before and any("lora_A" in n for n in before)
    for name, old in before.items():
        assert after[name].device.type == "cuda" and after[name].dtype == torch.float32, name
        assert not torch.equal(after[name].detach().cpu(), old), name


def test_qlora_trains_on_cuda():
    """The tiny MiDashengLM with NF4 language-model linears (bf16 compute), quantised on the CPU and
    moved to the device by the Trainer: 8 bf16-mixed steps on one batch lower the loss (on CPU the
    same run goes from 1.36 to 0.53), and the packed 4-bit weights stay as they were."""
    lora = LoraSettings(r=4, dropout=0.0, quantize_4bit=True, compute_dtype="bfloat16")
    model = tiny_module("midashenglm", manual_seed=0, backbone=dict(lora=lora), **trainable_parts(), learning_rate=1e-2)
    batch = model.collate(examples()[:4])
    layers = base_layers(model.backbone.language_model)
    packed = [plain(layer.weight) for layer in layers]
    record = Record()
    cuda_trainer(precision="bf16-mixed", max_steps=8, callbacks=[record]).fit(
        model, DataLoader([batch] * 8, batch_size=None))
    assert all(math.isfinite(loss) for loss in record.losses)
    assert sum(record.losses[-3:]) / 3 < 0.8 * record.losses[0], record.losses
    for before, layer in zip(packed, layers):
        assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.device.type == "cuda"
        assert layer.weight.quant_state.absmax.device.type == "cuda"
        assert torch.equal(plain(layer.weight), before)


def test_grad_cache_equals_the_plain_step_on_cuda():
    """Two steps of 8 pairs through the Trainer, with ``grad_cache_chunk_size`` 3 and without: the
    same losses, first-step gradients and final weights (float32; sums in another order only)."""
    items = examples()
    runs = {}
    for chunk in (None, 3):
        module = make_module(grad_cache=chunk)
        assert module.automatic_optimization == (chunk is None)
        batches = [module.collate(items[s * 8 : (s + 1) * 8]) for s in range(2)]
        record = Record()
        cuda_trainer(max_epochs=1, callbacks=[record]).fit(module, DataLoader(batches, batch_size=None))
        runs[chunk] = {"losses": record.losses, "grads": record.grads, "weights": trainable_state_dict(module)}
    assert len(runs[3]["losses"]) == 2 and "loss.temperature.log_scale" in runs[3]["grads"]
    assert_same_run(runs[3], runs[None])


def test_cuda_random_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.cuda.init()
    torch.cuda.manual_seed(3)
    torch.rand(5, device="cuda")  # move the generator off its seed
    state = capture_rng_state()
    assert "cuda" in state
    torch.save({"rng_states": [state]}, tmp_path / "states.ckpt")
    ones = torch.ones(4096, device="cuda")
    expected = F.dropout(ones, 0.5)
    torch.cuda.manual_seed(0)
    assert not torch.equal(F.dropout(ones, 0.5), expected)
    restore_rng_state(torch.load(tmp_path / "states.ckpt", weights_only=True)["rng_states"][0])
    assert torch.equal(F.dropout(ones, 0.5), expected)


@pytest.mark.parametrize(
    ("variant", "kill_at", "options"),
    [("plain", 6, []), ("grad_cache", 2, ["--checkpoint.monitor", "null"])],
)
def test_killed_cuda_run_resumes_to_the_uninterrupted_weights(tmp_path, tmp_path_factory, variant, kill_at, options):
    """tests/test_resume.py's kill-and-resume on the device: LoRA dropout draws from the CUDA
    generator (GradCache replays it per chunk), so only a restored CUDA state repeats the run."""
    options = [*CUDA_CLI, *options]
    expected = reference_weights(tmp_path_factory, variant, *options)
    data = data_root(tmp_path_factory)
    killed = run(tmp_path / "killed", variant, data, "--wait-at", str(kill_at), *options)
    wait_until_waiting(killed, tmp_path / "killed")
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    checkpoint = last_checkpoint(tmp_path / "killed")
    assert torch.load(checkpoint, weights_only=True)["global_step"] == kill_at
    resumed = tmp_path / "resumed"
    status = finish(run(resumed, variant, data, "--ckpt_path", str(checkpoint), *options), resumed)
    assert status == 0, log_of(resumed)
    weights = torch.load(resumed / "weights.pt")
    assert weights.keys() == expected.keys()
    assert "GPU available: True (cuda), used: True" in (resumed / "log.txt").read_text()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name


@pytest.fixture(scope="module")
def cuda_runs(tmp_path_factory):
    return cuda_results(tmp_path_factory)[0]


def test_fsdp2_on_one_cuda_device_with_nccl(cuda_runs):
    """FSDP2 over a one-device mesh: parameters are DTensors (τ kept whole), the process group is
    NCCL, training equals the single-device run, and resuming from the sharded checkpoint after
    epoch 0 repeats epoch 1."""
    fsdp = cuda_runs["fsdp"]
    assert fsdp["world"] == 1 and fsdp["backend"] == "nccl"
    assert [name for name, is_dtensor in fsdp["dtensor"].items() if not is_dtensor] == ["loss.temperature.log_scale"]
    assert_same_run(fsdp, cuda_runs["single"])
    resumed = cuda_runs["fsdp_resume"]
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(fsdp["losses"][2:]), rtol=1e-6, atol=0)
    assert_close_tensors(resumed["weights"], fsdp["weights"], rtol=1e-6)


def test_qlora_with_fsdp2_on_one_cuda_device(cuda_runs):
    """NF4 weights on the device stay whole beside the sharded parameters; training equals the
    single-device QLoRA run and learns."""
    qlora = cuda_runs["fsdp_qlora"]
    assert qlora["backend"] == "nccl"
    assert len([name for name, is_dtensor in qlora["dtensor"].items() if not is_dtensor]) == 4 * 7 + 1
    assert_same_run(qlora, cuda_runs["single_qlora"])
    assert qlora["losses"][-1] < qlora["losses"][0]
