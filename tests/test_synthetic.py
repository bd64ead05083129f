"""Synthetic data generation, the datasets' items, the epoch sampler and the data modules."""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules import (
    AudioPolicy,
    EpochSampler,
    EvalDataset,
    PairDataset,
    RetrievalDataModule,
    SyntheticDataModule,
    make_synthetic_dataset,
    read_manifest,
)
from datamodules.synthetic import EVENT_TYPES, SAMPLING_RATE
from datamodules.inputs import EmbedInput

SIZES = {"num_train": 40, "num_val": 10, "num_test": 30}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, str]:
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("synthetic")), seed=3, **SIZES)


def _rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _first_items(dataset, n: int = 10) -> list:
    return [dataset[i]["documents"][0].text for i in range(n)]


# --------------------------------------------------------------------------- generation


def test_same_seed_same_bytes(synthetic, tmp_path):
    again = make_synthetic_dataset(str(tmp_path), seed=3, **SIZES)
    for split in ("train", "val", "test"):
        assert filecmp.cmp(synthetic[split], again[split], shallow=False)
    first, second = (os.path.join(os.path.dirname(p["train"]), "audio", "train_00007.wav") for p in (synthetic, again))
    assert filecmp.cmp(first, second, shallow=False)


def test_other_seed_other_data(synthetic, tmp_path):
    other = make_synthetic_dataset(str(tmp_path), seed=4, **SIZES)
    assert [r["caption"] for r in _rows(other["test"])] != [r["caption"] for r in _rows(synthetic["test"])]


def test_second_call_reuses_the_cache(synthetic):
    root = os.path.dirname(os.path.dirname(synthetic["train"]))
    stamp = os.path.getmtime(synthetic["train"])
    assert make_synthetic_dataset(root, seed=3, **SIZES) == synthetic
    assert os.path.getmtime(synthetic["train"]) == stamp
    assert not [name for name in os.listdir(root) if name.startswith(".")]  # no scratch folders left


def test_splits_captions_and_audio(synthetic):
    assert len(EVENT_TYPES) >= 8
    used = set()
    for split, size in (("train", 40), ("val", 10), ("test", 30)):
        rows = _rows(synthetic[split])
        assert len(rows) == size
        for row in rows:
            assert len(row["caption"]) == 5 and len(set(row["caption"])) == 5
            assert row["caption_long"] and row["caption_short"]
            assert row["tags"] == [event["type"] for event in row["events"]]
            assert 1 <= len(row["events"]) <= 3 and all(1 <= e["count"] <= 3 for e in row["events"])
            used.update(row["tags"])
        if split != "train":  # evaluation clips never share content, hence never a caption
            sequences = [tuple((e["type"], e["count"]) for e in row["events"]) for row in rows]
            assert len(set(sequences)) == len(sequences)
    assert len(used) >= 8

    info = sf.info(os.path.join(os.path.dirname(synthetic["test"]), _rows(synthetic["test"])[0]["audio"]))
    assert info.samplerate == SAMPLING_RATE and info.channels == 1 and 1.0 <= info.duration <= 3.0


def test_classification_sets(synthetic):
    single, multi = _rows(synthetic["zs"]), _rows(synthetic["zs_multi"])
    assert len(single) == 15 and [row["label"] for row in single] == [e.tag for e in EVENT_TYPES] + [
        e.tag for e in EVENT_TYPES[:5]
    ]  # fmt: skip
    folder = os.path.dirname(synthetic["zs"])
    assert all(1.0 <= sf.info(os.path.join(folder, row["audio"])).duration <= 3.0 for row in single)
    test = _rows(synthetic["test"])
    assert [(row["audio"], row["labels"]) for row in multi] == [(row["audio"], row["tags"]) for row in test]
    assert all("caption" not in row for row in single + multi)


def test_captions_mention_count_and_order(synthetic):
    row = next(r for r in _rows(synthetic["test"]) if len(r["events"]) >= 2)
    first, second = row["events"][0]["type"], row["events"][1]["type"]
    parts = row["caption_short"].split(" then ")
    assert first in parts[0] and second in parts[1]
    counted = next(r for r in _rows(synthetic["train"]) if any(e["count"] == 2 for e in r["events"]))
    assert "two" in counted["caption_short"]


# --------------------------------------------------------------------------- datasets


def test_pair_dataset_items(synthetic):
    records = read_manifest(synthetic["train"])
    dataset = PairDataset(records, 16000, AudioPolicy(max_seconds=1.0), seed=0, document_instruction="Represent it.")
    item = dataset[2]

    assert set(item) == {"query", "documents", "clip_index", "clip_id", "audio_path", "source", "caption_kind", "tags"}
    assert item["source"] == records[2].source
    assert item["audio_path"] == records[2].audio_path
    assert isinstance(item["query"], EmbedInput) and item["query"].modality == "audio"
    assert item["query"].audio.dtype == np.float32 and len(item["query"].audio) <= 16000
    assert len(item["documents"]) == 1 and item["documents"][0].text in records[2].captions
    assert item["documents"][0].instruction == "Represent it."
    assert item["clip_index"] == 2 and item["clip_id"] == records[2].id
    assert item["caption_kind"] == "caption" and item["tags"] == records[2].tags


def test_pair_dataset_draws_depend_on_seed_and_epoch_only(synthetic):
    records = read_manifest(synthetic["train"])
    policy = AudioPolicy(max_seconds=1.0)
    a, b = PairDataset(records, 16000, policy, seed=0), PairDataset(records, 16000, policy, seed=0)
    assert _first_items(a) == _first_items(b)
    np.testing.assert_array_equal(a[5]["query"].audio, b[5]["query"].audio)

    epoch0 = _first_items(a)
    a.set_epoch(1)
    assert _first_items(a) != epoch0
    assert [a[(0, i)]["documents"][0].text for i in range(10)] == epoch0  # keys may carry the epoch
    assert _first_items(PairDataset(records, 16000, policy, seed=1)) != epoch0


def test_pair_dataset_caption_fields(synthetic):
    records = read_manifest(synthetic["train"])
    dataset = PairDataset(records, 16000, AudioPolicy(None), caption_fields=["caption_long", "caption_short", "tags"])
    kinds = set()
    for i in range(len(dataset)):
        item = dataset[i]
        kinds.add(item["caption_kind"])
        if item["caption_kind"] == "tags":
            assert item["documents"][0].text == ", ".join(records[i].tags)
    assert kinds == {"caption_long", "caption_short", "tags"}
    with pytest.raises(ValueError, match="none of the fields"):
        PairDataset(records, 16000, AudioPolicy(None), caption_fields=["caption_medium"])


def test_eval_dataset_gives_all_captions_and_head_crop(synthetic):
    records = read_manifest(synthetic["test"])
    dataset = EvalDataset(records, 8000, AudioPolicy(max_seconds=0.5), query_instruction="Find the caption.")
    item = dataset[0]
    assert [d.text for d in item["documents"]] == records[0].captions and len(item["documents"]) == 5
    assert len(item["query"].audio) == 4000 and item["query"].instruction == "Find the caption."
    np.testing.assert_array_equal(item["query"].audio, dataset[0]["query"].audio)


def test_qa_rows(tmp_path):
    sf.write(tmp_path / "q.wav", np.zeros(1600, dtype=np.float32), 16000)
    row = {"audio": "q.wav", "question": "Which sound?", "answer": "a beep", "choices": ["a beep", "a hum"],
           "instruction": "Answer from the audio."}  # fmt: skip
    (tmp_path / "qa.jsonl").write_text(json.dumps(row) + "\n")
    records = read_manifest(str(tmp_path / "qa.jsonl"))
    for dataset in (
        PairDataset(records, 16000, AudioPolicy(None), query_instruction="default"),
        EvalDataset(records, 16000, AudioPolicy(None), query_instruction="default"),
    ):
        item = dataset[0]
        assert item["caption_kind"] == "qa"
        assert item["query"].modality == "audio_text"
        assert item["query"].text == "Which sound?\nChoices: a beep; a hum"
        assert item["query"].instruction == "Answer from the audio."  # the row overrides the default
        assert [d.text for d in item["documents"]] == ["a beep"]


def test_epoch_sampler():
    sampler = EpochSampler(20, seed=0)
    first = list(sampler)
    assert first == list(sampler) and all(epoch == 0 for epoch, _ in first)
    assert sorted(i for _, i in first) == list(range(20))
    sampler.set_epoch(1)
    second = list(sampler)
    assert all(epoch == 1 for epoch, _ in second) and [i for _, i in second] != [i for _, i in first]
    assert [i for _, i in EpochSampler(5, shuffle=False)] == list(range(5))


# --------------------------------------------------------------------------- data modules


def _texts(loader) -> list[str]:
    return [item["documents"][0].text for batch in loader for item in batch]


def _identity(batch: list) -> list:
    return batch


def test_datamodule_epochs_reach_persistent_workers(synthetic):
    def loader_texts(num_workers: int) -> tuple[list[str], list[str]]:
        dm = RetrievalDataModule(train_manifest=synthetic["train"], batch_size=4, num_workers=num_workers)
        dm.bind(16000, _identity)
        dm.setup("fit")
        loader = dm.train_dataloader()
        epoch0 = _texts(loader)
        loader.sampler.set_epoch(1)  # what Lightning does before each epoch
        return epoch0, _texts(loader)

    plain = loader_texts(0)
    assert len(plain[0]) == 40 and plain[0] != plain[1]
    assert loader_texts(2) == plain


def test_datamodule_is_bound_explicitly_never_through_the_trainer(synthetic):
    dm = RetrievalDataModule(val_manifest=synthetic["val"], test_manifest=synthetic["test"], batch_size=4,
                             eval_batch_size=3)  # fmt: skip
    # A trainer with a model attached is not a binding: the data never reads the model.
    module = SimpleNamespace(backbone=SimpleNamespace(sampling_rate=8000), collate=_identity)
    dm.trainer = SimpleNamespace(lightning_module=module, current_epoch=0)
    dm.setup("validate")
    with pytest.raises(RuntimeError, match="bind"):
        dm.val_dataloader()
    dm.bind(module.backbone.sampling_rate, module.collate)
    batch = next(iter(dm.val_dataloader()))
    assert len(batch) == 3 and len(batch[0]["documents"]) == 5
    assert dm.sampling_rate == 8000
    with pytest.raises(ValueError, match="train_manifest"):
        dm.train_dataloader()


def test_the_cli_binds_the_models_collator_to_the_data(tmp_path):
    from lightning_modules import EmbeddingModule
    from main import EmbeddingCLI

    cli = EmbeddingCLI(EmbeddingModule, RetrievalDataModule, subclass_mode_data=True, run=False,
                       args=["--config", str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"),
                             "--data.init_args.root", str(tmp_path)])  # fmt: skip
    assert cli.datamodule.collate_fn is cli.model.collate
    assert cli.datamodule.sampling_rate == cli.model.backbone.sampling_rate


def test_loaders_pin_memory_for_cuda_trainers_only(synthetic):
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    module = SimpleNamespace(backbone=SimpleNamespace(sampling_rate=16000), collate=_identity)
    pinned = {}
    for accelerator in (CPUAccelerator(), CUDAAccelerator(), None):
        dm = RetrievalDataModule(val_manifest=synthetic["val"], batch_size=4)
        dm.trainer = SimpleNamespace(lightning_module=module, current_epoch=0, accelerator=accelerator)
        dm.setup("validate")
        dm.bind(module.backbone.sampling_rate, module.collate)
        pinned[type(accelerator).__name__] = dm.val_dataloader().pin_memory
    assert pinned == {"CPUAccelerator": False, "CUDAAccelerator": True, "NoneType": False}


def test_synthetic_datamodule(tmp_path):
    dm = SyntheticDataModule(root=str(tmp_path), seed=0, num_train=8, num_val=4, num_test=6, batch_size=2)
    dm.bind(16000, _identity)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.records["train"]) == 8 and len(dm.records["val"]) == 4
    assert len(next(iter(dm.train_dataloader()))) == 2
    dm.setup("predict")
    assert sum(len(batch) for batch in dm.predict_dataloader()) == 6


class _RecordingModule(pl.LightningModule):
    """Stands in for the embedding module: a sampling rate, a collate function, and a trivial loss."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.backbone = SimpleNamespace(sampling_rate=16000)
        self.seen: dict[int, list[str]] = {}

    def collate(self, batch: list) -> list:
        return batch

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(item["documents"][0].text for item in batch)
        return (self.weight**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_sets_the_epoch_through_the_sampler(synthetic):
    def fit(num_workers: int) -> dict[int, list[str]]:
        module = _RecordingModule()
        dm = RetrievalDataModule(train_manifest=synthetic["train"], batch_size=8, num_workers=num_workers)
        trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)  # fmt: skip
        dm.bind(module.backbone.sampling_rate, module.collate)
        dm.bind(module.backbone.sampling_rate, module.collate)
        trainer.fit(module, dm)
        return module.seen

    seen = fit(num_workers=2)
    assert len(seen[0]) == 40 and seen[0] != seen[1]
    assert seen == fit(num_workers=0)
