"""Short training runs of the tiny thinker under several strategies, for tests/test_fsdp.py and
tests/test_ddp.py (and tests/test_gpu.py on one CUDA device). Each run writes ``<out>/<run>.pt``
(from rank 0): per-step losses (averaged over ranks), the first step's gradients and the final
trainable weights, both gathered to full tensors, whether parameters were DTensors, and the
process group's backend.

    torchrun --nproc_per_node 2 tests/dist_scripts/train_tiny.py OUT RUN [RUN ...]
    python tests/dist_scripts/train_tiny.py OUT single ...   # one process, the whole global batch
    python tests/dist_scripts/train_tiny.py OUT single fsdp --accelerator gpu   # one CUDA device (NCCL)

Every run sees the same data: ``STEPS_PER_EPOCH`` global batches of ``GLOBAL_BATCH`` pairs per
epoch; with W processes, rank r takes rows [r·B/W, (r+1)·B/W) of each global batch, so the W
local batches together are exactly the single-process batch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for builders

from builders import tiny_module, tone_pairs, trainable_parts  # noqa: E402
from callbacks import NonFiniteGuard, RngStateCheckpoint, TrainableWeightsExport  # noqa: E402
from lightning_modules import EmbeddingModule  # noqa: E402
from lightning_modules.adapters import LoraSettings  # noqa: E402
from lightning_modules.strategies import FSDP2Strategy  # noqa: E402
from lightning_modules.weights import trainable_state_dict  # noqa: E402

GLOBAL_BATCH = 8
STEPS_PER_EPOCH = 2
EPOCHS = 2

#: run name → (strategy, module options, run mode). Mode "save": a checkpoint after each epoch and
#: the trainable-weights export; "resume": restart from the "save" run's first checkpoint.
RUNS = {
    "single": ("single", {}, None),
    "ddp": ("ddp", {}, None),
    "ddp_local": ("ddp", {"gather": "local"}, None),
    "ddp_grad_cache": ("ddp", {"grad_cache": 3}, None),
    "fsdp": ("fsdp", {}, "save"),
    "fsdp_resume": ("fsdp", {}, "resume"),
    "fsdp_grad_cache_checkpointing": ("fsdp", {"grad_cache": 3, "checkpointing": True}, None),
    "fsdp_qlora": ("fsdp", {"qlora": True}, None),
    "single_qlora": ("single", {"qlora": True}, None),
}


def examples() -> list[dict]:
    """One epoch of audio–caption pairs with different durations and pitches."""
    return tone_pairs(GLOBAL_BATCH * STEPS_PER_EPOCH, seconds_step=0.1, pitch_step=120)


def make_module(gather: str = "global", grad_cache: int | None = None, checkpointing: bool = False,
                qlora: bool = False) -> EmbeddingModule:
    lora = LoraSettings(r=4, dropout=0.0, quantize_4bit=qlora, compute_dtype="float32")
    # LoRA B starts at zero, which leaves A without gradient on the first step.
    return tiny_module(manual_seed=0, backbone=dict(lora=lora, gradient_checkpointing=checkpointing),
                       **trainable_parts(gather=gather), learning_rate=3e-3, grad_cache_chunk_size=grad_cache,
                       lora_b_std=0.1, per_name_generator=True)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu().clone()


class Record(Callback):
    """Per-step losses averaged over ranks (the global loss for both gather modes) and the first
    step's full gradients, read just before the optimizer step (after any reduction)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grads: dict[str, torch.Tensor] | None = None
        self.dtensor: dict[str, bool] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is None:
            self.grads = {n: full(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None}
            self.dtensor = {n: isinstance(p, DTensor) for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))


def run(name: str, out: Path, accelerator: str = "cpu") -> None:
    strategy_name, options, mode = RUNS[name]
    # Set by torchrun; the process group itself starts inside the first fit.
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    module = make_module(**options)
    items = examples()
    local = GLOBAL_BATCH // world
    batches = [module.collate(items[s * GLOBAL_BATCH + rank * local: s * GLOBAL_BATCH + (rank + 1) * local])
               for s in range(STEPS_PER_EPOCH)]
    record = Record()
    callbacks = [record, NonFiniteGuard(), RngStateCheckpoint()]
    ckpt_dir = out / "fsdp_checkpoints"
    if mode == "save":
        callbacks += [ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1),
                      TrainableWeightsExport(dirpath=str(out / name))]
    strategy = {"single": "auto", "ddp": DDPStrategy(), "fsdp": FSDP2Strategy()}[strategy_name]
    trainer = Trainer(accelerator=accelerator, devices=world, strategy=strategy,
                      max_epochs=EPOCHS, logger=False, enable_checkpointing=mode == "save",
                      enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                      num_sanity_val_steps=0, default_root_dir=str(out / name), callbacks=callbacks)
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader,
                ckpt_path=str(ckpt_dir / "epoch=0.ckpt") if mode == "resume" else None)
    weights = trainable_state_dict(module)  # collective under FSDP2
    if rank == 0:
        torch.save({"losses": record.losses, "grads": record.grads, "weights": weights, "dtensor": record.dtensor,
                    "world": world, "backend": dist.get_backend() if dist.is_initialized() else None}, out / f"{name}.pt")
    if dist.is_initialized():
        dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", nargs="+", choices=sorted(RUNS))
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    args = parser.parse_args()
    torch.set_num_threads(1)  # two processes on a small CPU machine: avoid oversubscription
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.runs:
        run(name, args.out, args.accelerator)


if __name__ == "__main__":
    main()
