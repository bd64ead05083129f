"""Duration-bucketed batches: determinism, sharding over ranks, padding, the duration cache and the
data module's train loader."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

import datamodules.bucketing as bucketing
from datamodules import RetrievalDataModule, make_synthetic_dataset
from datamodules.bucketing import DurationBatchSampler, manifest_durations


def _durations(n: int, seed: int = 0) -> np.ndarray:
    """A mix of 10 s clips, 15–30 s clips and short 1–5 s clips."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    return np.where(kind == 0, 10.0, np.where(kind == 1, rng.uniform(15, 30, n), rng.uniform(1, 5, n)))


def _batches(sampler: DurationBatchSampler, epoch: int) -> list[list[tuple[int, int]]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def _all_ranks(durations, world: int, epoch: int = 0, **kwargs) -> list[list[list[tuple[int, int]]]]:
    samplers = [DurationBatchSampler(durations, num_replicas=world, rank=r, **kwargs) for r in range(world)]
    return [_batches(sampler, epoch) for sampler in samplers]


# --------------------------------------------------------------------------- the sampler


def test_same_seed_and_epoch_same_batches():
    durations = _durations(200)
    first = _batches(DurationBatchSampler(durations, batch_size=8, pool_multiplier=4, seed=5), epoch=3)
    again = _batches(DurationBatchSampler(durations, batch_size=8, pool_multiplier=4, seed=5), epoch=3)
    other_seed = _batches(DurationBatchSampler(durations, batch_size=8, pool_multiplier=4, seed=6), epoch=3)
    assert first == again
    assert first != other_seed


def test_epochs_differ_and_keys_carry_the_epoch():
    sampler = DurationBatchSampler(_durations(200), batch_size=8, pool_multiplier=4)
    epoch0, epoch1 = _batches(sampler, 0), _batches(sampler, 1)
    assert [[i for _, i in b] for b in epoch0] != [[i for _, i in b] for b in epoch1]
    assert {e for b in epoch0 for e, _ in b} == {0} and {e for b in epoch1 for e, _ in b} == {1}
    assert _batches(sampler, 0) == epoch0  # going back to an epoch replays it


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_clip_once_per_epoch_across_ranks(world):
    batch_size = 4
    durations = _durations(batch_size * world * 10)  # divides evenly: nothing dropped or repeated
    for epoch in (0, 1):
        per_rank = _all_ranks(durations, world, epoch, batch_size=batch_size, pool_multiplier=3)
        seen = [i for batches in per_rank for batch in batches for _, i in batch]
        assert sorted(seen) == list(range(len(durations)))
        assert all(len(batch) == batch_size for batches in per_rank for batch in batches)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_equal_batch_counts_per_rank_and_drop_last(world, drop_last):
    n, batch_size = 103, 4
    samplers = [DurationBatchSampler(_durations(n), batch_size, 2, drop_last, 0, world, r) for r in range(world)]
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])
    # Every rank's step has the same number of clips, so collective ops never wait on a missing batch.
    assert len({tuple(len(batch) for batch in b) for b in per_rank}) == 1
    counts = Counter(i for batches in per_rank for batch in batches for _, i in batch)
    if drop_last:
        assert max(counts.values()) == 1
        assert n - batch_size * world < len(counts) <= n
        assert all(len(batch) == batch_size for batches in per_rank for batch in batches)
    else:
        assert len(counts) == n  # every clip; the repeats only pad to a multiple of the world size
        assert sum(counts.values()) - n < world


def test_dropped_clips_change_with_the_epoch():
    sampler = DurationBatchSampler(_durations(50), batch_size=8, pool_multiplier=2)
    kept = [{i for b in _batches(sampler, epoch) for _, i in b} for epoch in range(4)]
    assert len({frozenset(k) for k in kept}) > 1


def _padded_frames(durations: np.ndarray, batches: list[np.ndarray]) -> float:
    return sum(len(b) * durations[b].max() - durations[b].sum() for b in batches)


def test_bucketing_halves_the_padding_of_random_batches():
    durations, batch_size = _durations(4096), 16
    sampler = DurationBatchSampler(durations, batch_size=batch_size, pool_multiplier=32)
    bucketed = [np.array([i for _, i in b]) for b in sampler]
    order = np.random.default_rng(0).permutation(len(durations))
    random = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    assert _padded_frames(durations, bucketed) <= 0.5 * _padded_frames(durations, random)


def test_ranks_of_one_step_share_one_bucket():
    durations = _durations(960)

    def median_step_range(*ranks: np.ndarray) -> float:
        steps = np.concatenate([durations[r] for r in ranks], axis=1)
        return float(np.median(steps.max(axis=1) - steps.min(axis=1)))

    ranks = _all_ranks(durations, 2, batch_size=8)
    a, b = (np.array([[i for _, i in batch] for batch in batches]) for batches in ranks)
    assert (durations[a].max(axis=1) <= durations[b].min(axis=1)).all()  # slices of one sorted global batch
    order = np.random.default_rng(0).permutation(len(durations)).reshape(-1, 8)
    assert median_step_range(a, b) < 0.1 * median_step_range(order[0::2], order[1::2])


def test_rank_and_world_size_from_torch_distributed(monkeypatch):
    monkeypatch.setattr(bucketing.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(bucketing.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(bucketing.dist, "get_rank", lambda: 3)
    sampler = DurationBatchSampler(_durations(64), batch_size=4)
    assert (sampler.num_replicas, sampler.rank) == (4, 3) and len(sampler) == 4


def test_rejects_a_sampler_in_place_of_durations():
    # What Lightning's re-instantiation of a custom batch sampler would pass.
    with pytest.raises(TypeError, match="use_distributed_sampler=False"):
        DurationBatchSampler(torch.utils.data.SequentialSampler(range(8)), batch_size=2)
    with pytest.raises(ValueError):
        DurationBatchSampler([1.0, 2.0], batch_size=2, rank=2, num_replicas=2)


# --------------------------------------------------------------------------- the duration cache


@pytest.fixture
def counted(monkeypatch):
    """Replace header reads by a counter; every file lasts 1 + (its number) seconds."""
    calls = []

    def fake_duration(path: str) -> float:
        calls.append(path)
        return 1.0 + int(path.rsplit("_", 1)[1].split(".")[0])

    monkeypatch.setattr(bucketing, "audio_duration", fake_duration)
    return calls


def _manifest(tmp_path, n: int) -> tuple[str, list[str]]:
    paths = [str(tmp_path / f"clip_{i}.wav") for i in range(n)]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps({"audio": p, "caption": "x"}) + "\n" for p in paths))
    return str(manifest), paths


def test_cache_is_reused(tmp_path, counted):
    manifest, paths = _manifest(tmp_path, 5)
    first = manifest_durations(manifest, paths, str(tmp_path / "cache"))
    assert len(counted) == 5 and first.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    again = manifest_durations(manifest, paths, str(tmp_path / "cache"))
    assert len(counted) == 5 and again.tolist() == first.tolist()


def test_cache_is_invalidated_when_the_manifest_changes(tmp_path, counted):
    cache = str(tmp_path / "cache")
    manifest, paths = _manifest(tmp_path, 5)
    manifest_durations(manifest, paths, cache)
    manifest, paths = _manifest(tmp_path, 6)  # rewritten in place: new size and mtime
    assert manifest_durations(manifest, paths, cache).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert len(counted) == 11
    # Same manifest, other audio files (a JSON list read with another audio_dir): read again.
    manifest_durations(manifest, [p.replace("clip_", "other_clip_") for p in paths], cache)
    assert len(counted) == 17


def test_unwritable_cache_dir_only_warns(tmp_path, counted):
    manifest, paths = _manifest(tmp_path, 3)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="duration cache"):
        durations = manifest_durations(manifest, paths, str(blocker / "cache"))
    assert durations.tolist() == [1.0, 2.0, 3.0]


def test_corrupt_cache_is_rebuilt(tmp_path, counted):
    cache = tmp_path / "cache"
    manifest, paths = _manifest(tmp_path, 3)
    manifest_durations(manifest, paths, str(cache))
    (cached,) = cache.iterdir()
    cached.write_text("{not json")
    assert manifest_durations(manifest, paths, str(cache)).tolist() == [1.0, 2.0, 3.0]
    assert len(counted) == 6 and json.loads(cached.read_text())["durations"] == [1.0, 2.0, 3.0]


# --------------------------------------------------------------------------- the data module


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, str]:
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("synthetic")), seed=1, num_train=48, num_val=4,
                                  num_test=4)  # fmt: skip


def _identity(batch: list) -> list:
    return batch


def _bucketed(synthetic, tmp_path, **kwargs) -> RetrievalDataModule:
    dm = RetrievalDataModule(train_manifest=synthetic["train"], batch_size=4, bucket_by_duration=True,
                             bucket_pool_multiplier=3, duration_cache_dir=str(tmp_path / "cache"),
                             **kwargs)  # fmt: skip
    dm.bind(16000, _identity)
    return dm


def test_datamodule_bucketed_train_loader(synthetic, tmp_path):
    dm = _bucketed(synthetic, tmp_path, train_max_seconds=2.0)
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, DurationBatchSampler)
    durations = dm.train_durations()
    assert durations.max() <= 2.0 and durations.min() >= 1.0  # cropped to train_max_seconds
    batches = list(loader)
    assert len(batches) == 12 and all(len(b) == 4 for b in batches)
    assert sorted(item["clip_index"] for b in batches for item in b) == list(range(48))
    # The epoch reaches the dataset through the keys: epoch 1 draws other captions for the same clip.
    texts = {0: {item["clip_index"]: item["documents"][0].text for b in batches for item in b}}
    loader.batch_sampler.sampler.set_epoch(1)  # where Lightning calls it
    texts[1] = {item["clip_index"]: item["documents"][0].text for b in loader for item in b}
    assert texts[0] != texts[1]


def test_datamodule_under_a_distributed_trainer(synthetic, tmp_path):
    dm = _bucketed(synthetic, tmp_path)
    module = SimpleNamespace(backbone=SimpleNamespace(sampling_rate=16000), collate=_identity)

    # Lightning's loop counters between epochs 1 and 2, where the train loader starts (datamodules.resume).
    epochs = SimpleNamespace(current=SimpleNamespace(started=2, processed=2))
    fit_loop = SimpleNamespace(epoch_progress=epochs, epoch_loop=None)

    def trainer(flag: bool, rank: int) -> SimpleNamespace:
        return SimpleNamespace(lightning_module=module, fit_loop=fit_loop, world_size=2, global_rank=rank,
                               _accelerator_connector=SimpleNamespace(use_distributed_sampler=flag))  # fmt: skip

    dm.trainer = trainer(True, 0)
    with pytest.raises(ValueError, match="use_distributed_sampler"):
        dm.train_dataloader()
    seen = []
    for rank in (0, 1):
        dm.trainer = trainer(False, rank)
        sampler = dm.train_dataloader().batch_sampler
        assert (sampler.num_replicas, sampler.rank, sampler.epoch, len(sampler)) == (2, rank, 2, 6)
        seen += [i for batch in sampler for _, i in batch]
    assert sorted(seen) == list(range(48))
    # Evaluation is sharded by the data module too, so use_distributed_sampler=False is safe.
    dm.manifests["val"] = synthetic["val"]
    val = dm.val_dataloader()
    assert isinstance(val.sampler, torch.utils.data.DistributedSampler) and val.sampler.rank == 1


class _RecordingModule(pl.LightningModule):
    """A stand-in model that records the clip indices of every training batch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.backbone = SimpleNamespace(sampling_rate=16000)
        self.seen: dict[int, list[list[int]]] = {}

    def collate(self, batch: list) -> list:
        return batch

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).append([item["clip_index"] for item in batch])
        return (self.weight**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_drives_the_bucketed_epochs(synthetic, tmp_path):
    module, dm = _RecordingModule(), _bucketed(synthetic, tmp_path)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)  # fmt: skip
    dm.bind(module.backbone.sampling_rate, module.collate)
    trainer.fit(module, dm)
    expected = DurationBatchSampler(dm.train_durations(), batch_size=4, pool_multiplier=3)
    for epoch in (0, 1):
        assert module.seen[epoch] == [[i for _, i in b] for b in _batches(expected, epoch)]
    assert module.seen[0] != module.seen[1]


class _ShardRecorder(_RecordingModule):
    """Writes each rank's training batches to ``<out>.<rank>.json`` (spawned ranks return nothing)."""

    def __init__(self, out: str):
        super().__init__()
        self.out = out

    def on_train_end(self):
        with open(f"{self.out}.{self.global_rank}.json", "w", encoding="utf-8") as handle:
            json.dump(self.seen, handle)


@pytest.mark.slow
def test_two_process_ddp_shards_the_buckets(synthetic, tmp_path):
    dm = RetrievalDataModule(train_manifest=synthetic["train"], batch_size=4, bucket_by_duration=True,
                             duration_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False)  # fmt: skip
    dm.bind(16000, _identity)
    trainer.fit(_ShardRecorder(str(tmp_path / "seen")), dm)
    ranks = [json.loads((tmp_path / f"seen.{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        assert len(ranks[0][epoch]) == len(ranks[1][epoch]) == 6
        assert sorted(i for seen in ranks for batch in seen[epoch] for i in batch) == list(range(48))
    assert ranks[0]["0"] != ranks[0]["1"]
