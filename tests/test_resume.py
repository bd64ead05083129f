"""Exact resume: a run killed with SIGKILL mid-epoch and resumed from its last checkpoint ends with the
trainable weights of the uninterrupted run, bit for bit (CPU).

The end-to-end runs come from ``tests/dist_scripts/resume_run.py``: the tiny ALM2Vec setup (LoRA
with dropout, so the random states matter, learnable τ) with ``max_steps``, and the demo
(``configs/demo.yaml``) with ``max_epochs`` on each data module, ``SyntheticDataModule`` and
``RetrievalDataModule`` on JSONL manifests and ``WebDatasetDataModule`` on the same clips as shards;
2 epochs × 4 steps, a checkpoint after every step; the batches trained before the kill and after the
resume are those of the uninterrupted run, step by step. The other tests pin down the pieces: where
the data loader resumes, and the random states.
"""

import os
import random
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules import RetrievalDataModule, SyntheticDataModule
from datamodules.bucketing import DurationBatchSampler
from datamodules.datasets import EpochSampler
from datamodules.resume import ResumableSampler, resume_position
from dist_scripts.resume_run import (
    batches_of,
    data_root,
    finish,
    jsonl_manifests,
    last_checkpoint,
    log_of,
    reference_run,
    reference_weights,
    run,
    wait_until_waiting,
)
from callbacks.rng_state import capture_rng_state, restore_rng_state


@pytest.mark.parametrize(
    ("variant", "kill_at", "options", "trained"),
    [
        # Automatic optimisation, no workers, the CLI's checkpoint settings: Lightning defers step
        # checkpoints until validation has logged the monitored metric, so the kill is in epoch 1.
        ("plain", 6, [], ["loss.temperature.log_scale", "lora_A"]),
        # GradCache with learnable τ, 2 persistent workers, duration bucketing; killed in epoch 0.
        ("grad_cache", 2, ["--checkpoint.monitor", "null"], ["loss.temperature.log_scale", "lora_A"]),
        # The demo's max_epochs: Lightning builds the train loader before it restores the checkpoint
        # (issue 17: the resumed epoch replayed its first batches). Killed in epoch 1.
        ("demo", 6, ["--checkpoint.monitor", "null"], ["backbone.model.language_model"]),
        # The same on JSONL manifests, with 2 persistent workers and duration bucketing.
        ("jsonl", 5, ["--checkpoint.monitor", "null"], ["backbone.model.language_model"]),
        # The same manifest as WebDataset shards: killed after step 3 of epoch 1, so the resumed epoch
        # starts on the second worker's stream, one batch into it.
        ("shards", 7, ["--checkpoint.monitor", "null"], ["backbone.model.language_model"]),
    ],
)
def test_killed_run_resumes_to_the_uninterrupted_weights(
    tmp_path, tmp_path_factory, variant, kill_at, options, trained
):
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
    # The steps trained before the kill and after the resume are the uninterrupted run's, in order:
    # no batch repeated, none left out.
    reference = batches_of(reference_run(tmp_path_factory, variant, *options))
    assert batches_of(tmp_path / "killed") == reference[:kill_at]
    assert batches_of(resumed) == reference[kill_at:]
    weights = torch.load(resumed / "weights.pt")
    assert weights.keys() == expected.keys()
    assert all(any(part in name for name in weights) for part in trained)
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name


def progress(epochs: tuple[int, int], batches: int, last: bool) -> SimpleNamespace:
    """A trainer stand-in with Lightning's restored counters: epochs (started, processed), batches
    processed in the current epoch, and whether the last fetched batch was the epoch's last."""
    started, processed = epochs
    epoch_progress = SimpleNamespace(current=SimpleNamespace(started=started, processed=processed))
    batch_progress = SimpleNamespace(current=SimpleNamespace(processed=batches), is_last_batch=last)
    loop = SimpleNamespace(epoch_progress=epoch_progress, epoch_loop=SimpleNamespace(batch_progress=batch_progress))
    return SimpleNamespace(fit_loop=loop)


def test_resume_position_reads_where_the_checkpoint_was_written():
    assert resume_position(None) == (0, 0)
    assert resume_position(progress((0, 0), 0, False)) == (0, 0)  # a fresh fit
    assert resume_position(progress((2, 1), 3, False)) == (1, 3)  # after step 3 of epoch 1 (of 4)
    assert resume_position(progress((2, 1), 4, True)) == (2, 0)  # after epoch 1's last step
    assert resume_position(progress((2, 2), 4, True)) == (2, 0)  # between epochs 1 and 2


class Keys(Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, key):
        return key


def epochs_of(loader: DataLoader, sampler, first_epoch: int) -> list[list]:
    """Two epochs of batches, the epoch set as Lightning sets it."""
    out = []
    for epoch in (first_epoch, first_epoch + 1):
        sampler.set_epoch(epoch)
        out.append([[key[1] for key in batch] for batch in loader])
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("bucketing", [False, True])
def test_resumed_epoch_starts_after_the_trained_batches(workers, bucketing):
    """The resumed epoch yields the uninterrupted epoch's batches after the first 2, the loader keeps
    the full length (Lightning counts the skipped batches), and the next epoch is whole. With workers
    the loader asks for two iterators when it starts; both must skip."""

    def loader(epoch: int, skip: int) -> tuple[DataLoader, object]:
        options = dict(num_workers=workers, persistent_workers=workers > 0, collate_fn=list)
        if bucketing:
            batches = DurationBatchSampler(np.linspace(1, 5, 24), 4, seed=3)
            batches.resume_at(epoch, skip)
            return DataLoader(Keys(), batch_sampler=batches, **options), batches.sampler
        sampler = ResumableSampler(EpochSampler(24, seed=3), num_replicas=1, rank=0)
        sampler.resume_at(epoch, skip * 4)
        return DataLoader(Keys(), batch_size=4, sampler=sampler, drop_last=True, **options), sampler

    whole = epochs_of(*loader(1, 0), first_epoch=1)
    resumed_loader, sampler = loader(1, 2)
    assert len(resumed_loader) == 6
    resumed = epochs_of(resumed_loader, sampler, first_epoch=1)
    assert resumed[0] == whole[0][2:]
    assert resumed[1] == whole[1]
    assert whole[0] != whole[1]


def clip_indices(items: list[dict]) -> list[int]:
    return [item["clip_index"] for item in items]


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """What Lightning does before each epoch: ``set_epoch`` on the sampler and the batch sampler's."""
    for sampler in {id(s): s for s in (loader.sampler, getattr(loader.batch_sampler, "sampler", None))}.values():
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["synthetic", "jsonl_bucketing"])
def test_a_loader_built_before_the_restore_is_moved_in_place(tmp_path, tmp_path_factory, kind, workers):
    """Under FSDP2 (ModelParallelStrategy) Lightning restores the data module's state after
    ``configure_optimizers`` has built and started the train loader (``max_epochs``). Restoring the
    position of a checkpoint written after step 2 of epoch 1 then moves that loader, and the iterator
    already started yields the uninterrupted epoch 1 after its first 2 batches."""
    root = data_root(tmp_path_factory)
    common = dict(batch_size=4, num_workers=workers, duration_cache_dir=str(root / "durations"))

    def datamodule():
        if kind == "synthetic":
            module = SyntheticDataModule(root=str(root), num_train=32, num_val=8, num_test=8, **common)
        else:
            module = RetrievalDataModule(train_manifest=jsonl_manifests(root)["train"], bucket_by_duration=True,
                                         **common)  # fmt: skip
        module.setup("fit")
        module.bind(16000, clip_indices)
        return module

    whole = datamodule().train_dataloader()
    set_epoch(whole, 1)
    expected = list(whole)

    module = datamodule()
    loader = module.train_dataloader()  # before the restore: a fresh run's position
    started = iter(loader)
    torch.save({"train_position": [1, 2]}, tmp_path / "state.ckpt")  # as a checkpoint carries it
    module.load_state_dict(torch.load(tmp_path / "state.ckpt", weights_only=True))
    set_epoch(loader, 1)
    assert len(loader) == len(expected) == 8
    assert list(started) == expected[2:]


def test_the_datamodule_state_holds_the_position_of_the_next_batch():
    module = RetrievalDataModule(train_manifest="unused.jsonl")
    module.trainer = progress((2, 1), 3, False)  # saved after step 3 of epoch 1
    assert module.state_dict() == {"train_position": [1, 3]}


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    torch.save({"rng_states": [capture_rng_state()]}, tmp_path / "states.ckpt")
    expected = (random.random(), np.random.standard_normal(), np.random.random(), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    restore_rng_state(torch.load(tmp_path / "states.ckpt", weights_only=True)["rng_states"][0])
    again = (random.random(), np.random.standard_normal(), np.random.random(), torch.rand(3))
    assert again[:3] == expected[:3]
    assert torch.equal(again[3], expected[3])
