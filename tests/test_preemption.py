"""Preemption: on SIGTERM or SIGUSR1 the run saves a checkpoint at the end of the running step and
exits with status 0; resuming from that checkpoint ends with the uninterrupted run's weights."""

import os
import signal

import pytest
import torch
from lightning import Callback, Trainer
from torch.utils.data import DataLoader

from callbacks import PreemptionCheckpoint
from dist_scripts.resume_run import data_root, finish, log_of, reference_weights, run, wait_until_waiting
from dist_scripts.train_tiny import examples, make_module


def test_sigterm_saves_a_checkpoint_exits_cleanly_and_resumes(tmp_path, tmp_path_factory):
    """The signal arrives as step 6 of 8 starts (epoch 1, after its first step); the step finishes,
    ``preempted.ckpt`` holds the state after it, and training goes no further."""
    expected = reference_weights(tmp_path_factory, "plain")
    data = data_root(tmp_path_factory)
    preempted = tmp_path / "preempted"
    process = run(preempted, "plain", data, "--wait-at", "5")
    wait_until_waiting(process, preempted)
    os.kill(process.pid, signal.SIGTERM)
    assert finish(process, preempted) == 0, log_of(preempted)
    checkpoint = preempted / "lightning_logs" / "version_0" / "checkpoints" / "preempted.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 6
    assert f"SIGTERM: saved {checkpoint} at global step 6" in log_of(preempted)
    assert "weights_only" not in log_of(preempted)  # the full state is saved on purpose (issue 17)
    assert not (preempted / "weights.pt").exists()  # written at the end of training, which never came

    resumed = tmp_path / "resumed"
    assert finish(run(resumed, "plain", data, "--ckpt_path", str(checkpoint)), resumed) == 0, log_of(resumed)
    weights = torch.load(resumed / "weights.pt")
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name


class SendSignal(Callback):
    """Sends ``signum`` to this process while step ``at`` runs."""

    def __init__(self, signum: int, at: int) -> None:
        self.signum, self.at = signum, at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), self.signum)


def test_sigusr1_stops_after_the_running_step_and_runs_the_previous_handler_there(tmp_path, monkeypatch):
    """In-process, with SLURM's early-warning signal. The handler in place before training stands for
    Lightning's SLURM requeue handler: it runs once, at the step boundary, after the checkpoint."""
    for name in [name for name in os.environ if name.startswith("SLURM_")]:
        monkeypatch.delenv(name)  # inside a SLURM job, Lightning would requeue it on SIGUSR1
    module = make_module()
    items = examples()
    loader = DataLoader([module.collate(items[i : i + 2]) for i in range(0, 8, 2)], batch_size=None)
    preemption = PreemptionCheckpoint(signals=["SIGUSR1"], dirpath=str(tmp_path))
    trainer = Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[preemption, SendSignal(signal.SIGUSR1, at=1)])
    calls = []

    def previous(signum, frame) -> None:
        calls.append((signum, trainer.global_step, os.path.exists(tmp_path / "preempted.ckpt")))

    original = signal.signal(signal.SIGUSR1, previous)
    try:
        with pytest.raises(SystemExit) as stopped:
            trainer.fit(module, train_dataloaders=loader)
        assert signal.getsignal(signal.SIGUSR1) is previous  # Lightning's teardown put it back
    finally:
        signal.signal(signal.SIGUSR1, original)
    assert stopped.value.code is None  # exit status 0
    assert trainer.global_step == 2
    assert calls == [(signal.SIGUSR1, 2, True)]
    assert preemption.path == str(tmp_path / "preempted.ckpt")
    checkpoint = torch.load(preemption.path, weights_only=True)
    assert checkpoint["global_step"] == 2
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 2


def test_signals_are_checked_and_can_be_turned_off():
    with pytest.raises(ValueError, match="SIGNOPE"):
        PreemptionCheckpoint(signals=["SIGTERM", "SIGNOPE"])
    assert PreemptionCheckpoint(signals=[]).signals == []
