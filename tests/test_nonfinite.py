"""The non-finite guard (the ``NonFiniteGuard`` callback, ``--nonfinite.mode``): a batch with NaN in a waveform skips its
optimiser step without changing the weights or AdamW's state and is counted, or stops training with
an error naming its clips; on both optimisation paths (automatic, GradCache's manual one)."""

import numpy as np
import pytest
import torch
from lightning import Callback, Trainer
from torch.utils.data import DataLoader

from builders import quiet_trainer, tiny_module, tone_pairs, trainable_parts
from callbacks import NonFiniteGuard
from lightning_modules import EmbeddingModule, LoraSettings
from datamodules.inputs import EmbedInput

POISONED = 1  # index of the batch with a NaN waveform


def make_module(grad_cache: int | None) -> EmbeddingModule:
    return tiny_module(manual_seed=0, backbone=dict(lora=LoraSettings(r=4, dropout=0.0)), **trainable_parts(),
                       learning_rate=1e-3, grad_cache_chunk_size=grad_cache)


def batches(module: EmbeddingModule) -> list[dict]:
    items = tone_pairs()
    for i, item in enumerate(items):
        item["clip_id"] = f"clip{i:02d}"
    wave = items[3]["query"].audio.copy()
    wave[100:200] = np.nan
    items[3] = {**items[3], "query": EmbedInput(audio=wave)}
    return [module.collate(items[start : start + 2]) for start in range(0, 6, 2)]


def snapshot(module: EmbeddingModule, optimizer: torch.optim.Optimizer) -> dict:
    weights = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    moments = [{key: value.clone() for key, value in optimizer.state[p].items()}
               for group in optimizer.param_groups for p in group["params"]]
    return {"weights": weights, "moments": moments}


def same(a: dict, b: dict) -> bool:
    if a["weights"].keys() != b["weights"].keys() or len(a["moments"]) != len(b["moments"]):
        return False
    equal = all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    for x, y in zip(a["moments"], b["moments"]):
        equal &= x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    return equal


class Snapshots(Callback):
    """Weights and AdamW state before and after every training batch."""

    def __init__(self) -> None:
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before[batch_idx] = snapshot(pl_module, trainer.optimizers[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[batch_idx] = snapshot(pl_module, trainer.optimizers[0])


def fit(module: EmbeddingModule, tmp_path, guard: NonFiniteGuard, callbacks=()) -> Trainer:
    trainer = quiet_trainer(max_epochs=1, enable_checkpointing=False, default_root_dir=tmp_path,
                            callbacks=[guard, *callbacks])
    trainer.fit(module, train_dataloaders=DataLoader(batches(module), batch_size=None))
    return trainer


@pytest.mark.parametrize("grad_cache", [None, 1], ids=["automatic", "grad_cache"])
def test_poisoned_batch_skips_its_step_and_is_counted(tmp_path, caplog, grad_cache):
    module, guard = make_module(grad_cache), NonFiniteGuard("skip")
    snapshots = Snapshots()
    trainer = fit(module, tmp_path, guard, [snapshots])
    assert trainer.global_step == 3  # the skipped step counts, as Lightning counts it
    assert guard.skipped == 1
    assert trainer.callback_metrics["train/nonfinite_skipped"] == 1
    assert same(snapshots.before[POISONED], snapshots.after[POISONED])  # weights, moments, AdamW step
    for batch_idx in (0, 2):
        assert not same(snapshots.before[batch_idx], snapshots.after[batch_idx])
    assert all(torch.isfinite(w).all() for w in snapshots.after[2]["weights"].values())
    assert "optimiser step skipped" in caplog.text and "['clip02', 'clip03']" in caplog.text


@pytest.mark.parametrize("grad_cache", [None, 1], ids=["automatic", "grad_cache"])
def test_error_mode_names_the_batch_clips(tmp_path, grad_cache):
    module = make_module(grad_cache)
    snapshots = Snapshots()
    message = r"non-finite loss and gradients at global step 1 .*: \['clip02', 'clip03'\]"
    with pytest.raises(FloatingPointError, match=message):
        fit(module, tmp_path, NonFiniteGuard("error"), [snapshots])
    assert same(snapshots.before[POISONED], snapshot(module, module.trainer.optimizers[0]))


def test_every_process_takes_the_same_decision(tmp_path, monkeypatch):
    """When another process reports a non-finite value (the reduction says "not all finite"), this
    process skips its step too, although its own batch is clean."""
    module, guard = make_module(None), NonFiniteGuard("skip")
    decisions = []

    def reduce_boolean_decision(decision: bool, all: bool = True) -> bool:  # noqa: A002 - Lightning's name
        decisions.append((decision, all))
        return False

    snapshots = Snapshots()
    trainer = quiet_trainer(max_steps=1, enable_checkpointing=False, default_root_dir=tmp_path,
                            callbacks=[guard, snapshots])
    monkeypatch.setattr(trainer.strategy, "reduce_boolean_decision", reduce_boolean_decision)
    trainer.fit(module, train_dataloaders=DataLoader(batches(module)[:1], batch_size=None))
    assert decisions == [(True, True)]
    assert guard.skipped == 1
    assert same(snapshots.before[0], snapshots.after[0])


def test_nonfinite_setting_is_checked():
    with pytest.raises(ValueError, match="nonfinite"):
        NonFiniteGuard("ignore")


def test_skip_count_is_kept_in_checkpoints(tmp_path):
    module, guard = make_module(None), NonFiniteGuard("skip")
    trainer = fit(module, tmp_path, guard)
    trainer.save_checkpoint(tmp_path / "skipped.ckpt")
    checkpoint = torch.load(tmp_path / "skipped.ckpt", weights_only=True)
    restored = NonFiniteGuard()
    restored.load_state_dict(checkpoint["callbacks"][guard.state_key])
    assert restored.skipped == 1
