"""WebDataset shards: the writer, the split over processes and workers, order, resume, bad samples,
and one epoch of the tiny model through the CLI.

Shards are generated here: manifests of short WAV and FLAC clips written by soundfile, sharded by
``python main.py shard``, or tar files put together member by member for the broken cases. The
split is checked against the set of every sample of the shards (by brute force over many layouts),
and the loaders against the clip ids of the manifest they were written from. The end-to-end resume
(killed run, resumed run, bit-identical weights and batches) is the ``shards`` case of
``tests/test_resume.py``; the run over 2 DDP processes with 2 workers each is the last test.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from callbacks import SkippedSampleReport
from datamodules import AudioPolicy, ManifestError, WebDatasetDataModule
from datamodules.audio import AudioDecodeError, load_audio
from datamodules.bad_samples import SkippedSample
from datamodules.manifest import read_jsonl
from datamodules.shard_writer import main as shard, parse_size, shard_key
from datamodules.shards import ShardPlan, ShardReadError, expand_shards, shard_samples
from main import main

RATE = 16_000
REPO = Path(__file__).resolve().parents[1]


# --- data ---------------------------------------------------------------------------------------


def write_clips(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` tones of 0.2-1.5 s (WAV at 16 kHz, FLAC at 22.05 kHz in turn) with two captions
    each, ids with dots and slashes (not tar-safe), tags and a long caption; the JSONL manifest."""
    rng = np.random.default_rng(seed)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        rate, ext = (RATE, "wav") if i % 2 == 0 else (22_050, "flac")
        seconds = float(rng.uniform(0.2, 1.5))
        t = np.arange(round(seconds * rate)) / rate
        audio = f"audio/c{i:03d}.{ext}"
        sf.write(folder / audio, (0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t)).astype(np.float32), rate)
        rows.append({"id": f"set.a/clip.{i:03d}", "audio": audio, "caption": [f"tone {i}", f"a tone number {i}"],
                     "caption_long": f"a steady tone, clip {i}", "tags": ["tone", f"t{i % 3}"]})  # fmt: skip
    manifest = folder / "train.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def make_shards(folder: Path, manifest: Path, *options: str) -> str:
    """Shard ``manifest`` into ``folder`` with the CLI tool; the brace pattern it prints."""
    assert shard(["--manifest", str(manifest), "--output_dir", str(folder), *options]) == 0
    return str(folder / json.loads((folder / "index.json").read_text())["pattern"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """26 clips as 6 shards of at most 5 clips, with the manifest they come from."""
    root = tmp_path_factory.mktemp("shard_corpus")
    manifest = write_clips(root / "clips", 26)
    pattern = make_shards(root / "shards", manifest, "--max_count", "5")
    ids = [record.id for record in read_jsonl(str(manifest))]
    return {"root": root, "manifest": manifest, "pattern": pattern, "ids": ids}


def fresh_trainer(world: int = 1, rank: int = 0) -> SimpleNamespace:
    """A trainer stand-in: the process's place and Lightning's loop counters of a fresh fit."""
    epochs = SimpleNamespace(current=SimpleNamespace(started=0, processed=0))
    batches = SimpleNamespace(current=SimpleNamespace(processed=0), is_last_batch=False)
    loop = SimpleNamespace(epoch_progress=epochs, epoch_loop=SimpleNamespace(batch_progress=batches))
    return SimpleNamespace(world_size=world, global_rank=rank, fit_loop=loop, state=SimpleNamespace(fn="fit"))


def clip_ids(items: list) -> list:
    """A collate function that keeps the clip id of each item, or the reason of each skipped one."""
    return [item["clip_id"] if isinstance(item, dict) else item for item in items]


def datamodule(pattern: str, world: int = 1, rank: int = 0, **options) -> WebDatasetDataModule:
    module = WebDatasetDataModule(train_shards=pattern, **{"batch_size": 4, "shuffle_buffer": 6, **options})
    module.trainer = fresh_trainer(world, rank)
    module.setup("fit")
    module.bind(RATE, clip_ids)
    return module


def epoch_batches(loader, epoch: int) -> list[list]:
    loader.sampler.set_epoch(epoch)  # what Lightning calls before each epoch
    return list(loader)


def tar_file(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def wav_bytes(seconds: float = 0.3, rate: int = RATE) -> bytes:
    out = io.BytesIO()
    sf.write(out, (0.2 * np.sin(np.arange(round(seconds * rate)) / 7)).astype(np.float32), rate, format="WAV")
    return out.getvalue()


def sample(key: str, row: dict | bytes | None = None, audio: bytes | None = None, ext: str = "wav") -> list:
    """The members of one sample (``None`` leaves one out; ``row`` as bytes is written as it is)."""
    members = []
    if audio is not None:
        members.append((f"{key}.{ext}", audio))
    if row is not None:
        members.append((f"{key}.json", row if isinstance(row, bytes) else json.dumps(row).encode()))
    return members


# --- the writer ---------------------------------------------------------------------------------


def test_shards_hold_the_manifest_rows_and_the_original_audio_bytes(corpus):
    records = {r.id: r for r in read_jsonl(str(corpus["manifest"]))}
    urls = expand_shards(corpus["pattern"])
    index = json.loads((Path(urls[0]).parent / "index.json").read_text())
    assert [Path(u).name for u in urls] == [e["url"] for e in index["shards"]] == [f"train-{i:06d}.tar" for i in range(6)]
    assert [e["samples"] for e in index["shards"]] == [5, 5, 5, 5, 5, 1] and index["samples"] == 26
    seen = []
    for url, entry in zip(urls, index["shards"]):
        assert Path(url).stat().st_size == entry["bytes"]
        for key, members in shard_samples(url):
            row = json.loads(members["json"])
            record = records[row["id"]]
            ext = record.audio_path.rsplit(".", 1)[1]
            assert set(members) == {ext, "json"} and "." not in key and "/" not in key
            assert members[ext] == Path(record.audio_path).read_bytes()  # not re-encoded
            assert row["text"] == record.captions and row["tags"] == record.tags
            assert row["caption_long"] == record.extra["caption_long"]
            assert math.isclose(row["duration"], sf.info(record.audio_path).duration, abs_tol=1e-6)
            seen.append(row["id"])
    assert sorted(seen) == sorted(records) and seen != list(records)  # all of them, shuffled


def test_shard_keys_are_tar_safe_and_unique():
    used: set[str] = set()
    keys = [shard_key(name, used) for name in ["a.b/c", "a_b_c", "a.b/c", "x" * 200, "ü.wav"]]
    assert keys[:3] == ["a_b_c", "a_b_c_1", "a_b_c_2"]
    assert len(keys[3]) <= 64 and keys[4] == "__wav" and len(set(keys)) == 5
    assert parse_size("1GB") == 10**9 and parse_size("2 MiB") == 2 * 2**20 and parse_size("1e4") == 10_000
    with pytest.raises(ValueError, match="not a size"):
        parse_size("big")


def _member_bytes(sizes) -> int:
    """Bytes members of these sizes take in a tar: a 512-byte header each, the data padded to 512."""
    return sum(512 + -(-size // 512) * 512 for size in sizes)


def _archive_bytes(members: int) -> int:
    """A tar file's size: its members, two zero blocks, padded to a 10240-byte record."""
    return -(-(members + 1024) // 10240) * 10240


def test_shards_stay_under_max_size(tmp_path, corpus):
    pattern = make_shards(tmp_path / "sized", corpus["manifest"], "--max_size", "160KB", "--keep_order")
    urls = expand_shards(pattern)
    samples = [list(shard_samples(u)) for u in urls]
    assert sum(map(len, samples)) == 26 and len(urls) > 3
    assert [json.loads(m["json"])["id"] for s in samples for _, m in s] == corpus["ids"]  # --keep_order
    for url, shard_members, following in zip(urls, samples, samples[1:] + [None]):
        members = _member_bytes(len(data) for _, m in shard_members for data in m.values())
        assert Path(url).stat().st_size == _archive_bytes(members) <= 160_000
        if following:  # closed because the next clip would not have fitted
            assert _archive_bytes(members + _member_bytes(len(d) for d in following[0][1].values())) > 160_000


def test_index_of_existing_shards_matches_the_writers(tmp_path, corpus):
    written = json.loads((Path(corpus["pattern"]).parent / "index.json").read_text())
    out = tmp_path / "again.json"
    assert shard(["--index_shards", corpus["pattern"], "--index_output", str(out)]) == 0
    again = json.loads(out.read_text())
    folder = Path(corpus["pattern"]).parent
    assert [(Path(folder / e["url"]).resolve().name, e["samples"], e["bytes"]) for e in again["shards"]] == [
        (e["url"], e["samples"], e["bytes"]) for e in written["shards"]
    ]


def test_writer_refuses_to_mix_with_existing_shards(tmp_path, corpus, capsys):
    make_shards(tmp_path / "out", corpus["manifest"])
    with pytest.raises(SystemExit):
        shard(["--manifest", str(corpus["manifest"]), "--output_dir", str(tmp_path / "out")])
    assert "--overwrite" in capsys.readouterr().err


def test_writer_names_a_bad_row_or_leaves_it_out_and_counts_it(tmp_path, corpus):
    rows = corpus["manifest"].read_text().splitlines()[:3] + [json.dumps({"audio": "audio/gone.wav", "caption": "x"})]
    manifest = corpus["manifest"].parent / "dirty.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    with pytest.raises(ManifestError, match=r"dirty\.jsonl:4: audio file not found: .*gone\.wav"):
        shard(["--manifest", str(manifest), "--output_dir", str(tmp_path / "strict")])
    make_shards(tmp_path / "lenient", manifest, "--on_bad_sample", "skip")
    index = json.loads((tmp_path / "lenient" / "index.json").read_text())
    assert index["samples"] == 3 and index["skipped"] == {"missing_file": 1}


def test_check_data_says_it_leaves_the_shards_to_training(tmp_path, corpus, capsys):
    from datamodules.check import main as check_data

    config = tmp_path / "shards.yaml"
    config.write_text(json.dumps({"data": {"class_path": "WebDatasetDataModule", "init_args": {
        "train_shards": corpus["pattern"], "val_manifest": str(corpus["manifest"])}}}))  # fmt: skip
    assert check_data(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "train: 6 WebDataset shards, not scanned here" in out and "val " in out


# --- the split ----------------------------------------------------------------------------------

LAYOUTS = [
    ([5, 5, 5, 5, 5, 1], 1, 1, 4),
    ([5, 5, 5, 5, 5, 1], 2, 2, 4),
    ([5, 5, 5, 5, 5, 1], 3, 2, 8),
    ([7, 0, 3, 11, 2], 2, 3, 2),
    ([40], 2, 2, 4),  # fewer shards than processes x workers: the parts lie inside the shard
    ([3, 3], 3, 2, 1),  # batches of one clip
    ([9, 1, 1, 1, 20, 2], 3, 4, 3),
    ([1] * 17, 2, 2, 8),
]


@pytest.mark.parametrize("counts,world,streams,batch", LAYOUTS)
def test_plan_partitions_every_epoch_with_equal_steps(counts, world, streams, batch):
    plan = ShardPlan(counts, batch, world, streams, seed=3)
    everything = Counter((shard, i) for shard, count in enumerate(counts) for i in range(count))
    for epoch in (0, 1, 2):
        read = Counter()
        for rank in range(world):
            sizes = plan.batch_sizes(rank)
            assert len(sizes) == plan.steps and sum(sizes) == plan.rank_samples[rank]
            assert all(1 <= size <= batch for size in sizes) and sizes == sorted(sizes, reverse=True)
            full = sizes.count(batch)
            # As many full batches as possible: one more would leave some batch empty.
            assert full == plan.steps or (full + 1) * batch + (plan.steps - full - 1) > plan.rank_samples[rank]
            assert batch > 1 or sizes == [1] * plan.steps
            for stream in range(streams):
                pieces = plan.stream_pieces(epoch, rank, stream)
                assert sum(end - begin for _, begin, end in pieces) == sum(plan.stream_batch_sizes(rank, stream))
                read.update((shard, i) for shard, begin, end in pieces for i in range(begin, end))
        assert read == everything  # every sample exactly once
    assert sum(plan.rank_samples) == sum(counts) and max(plan.rank_samples) - min(plan.rank_samples) <= 1
    if len(counts) > 2:
        assert not np.array_equal(plan.shard_order(0), plan.shard_order(1))


def test_plan_refuses_what_cannot_be_split_evenly():
    with pytest.raises(ValueError, match="fewer than the 4 processes"):
        ShardPlan([1, 2], 8, world_size=4)
    with pytest.raises(ValueError, match="batch size above 1"):
        ShardPlan([3, 3], 1, world_size=4)
    assert ShardPlan([3, 3], 1, world_size=3).batch_sizes(2) == [1, 1]


@pytest.mark.parametrize("bucketing", [False, True])
def test_two_processes_with_two_workers_read_every_sample_once_per_epoch(corpus, bucketing):
    """The real loaders of ranks 0 and 1 of 2, each with 2 persistent workers, over two epochs."""
    runs = {}
    for rank in (0, 1):
        module = datamodule(corpus["pattern"], world=2, rank=rank, num_workers=2, bucket_by_duration=bucketing,
                            bucket_pool_multiplier=2)  # fmt: skip
        loader = module.train_dataloader()
        runs[rank] = [epoch_batches(loader, epoch) for epoch in (0, 1)]
        assert len(loader) == 4 == len(runs[rank][0]) == len(runs[rank][1])  # 13 clips: 4 + 4 + 4 + 1
    for epoch in (0, 1):
        seen = Counter(clip for rank in (0, 1) for batch in runs[rank][epoch] for clip in batch)
        assert seen == Counter(corpus["ids"])
    assert runs[0][0] != runs[0][1] and runs[1][0] != runs[1][1]  # each epoch its own order
    assert [len(b) for b in runs[0][0]] == [4, 4, 4, 1]


def test_workers_do_not_change_what_a_process_reads(corpus):
    """With one worker or none the process reads the same epoch, only split into other streams."""
    epochs = {}
    for workers in (0, 1, 2):
        loader = datamodule(corpus["pattern"], num_workers=workers).train_dataloader()
        epochs[workers] = epoch_batches(loader, 0)
    assert epochs[0] == epochs[1]  # one stream either way
    assert sorted(sum(epochs[0], [])) == sorted(sum(epochs[2], [])) == sorted(corpus["ids"])


def test_bucketed_batches_hold_neighbouring_durations(corpus):
    module = datamodule(corpus["pattern"], batch_size=3, bucket_by_duration=True, bucket_pool_multiplier=3)
    dataset = module.train_dataloader().dataset
    durations = {r.id: sf.info(r.audio_path).duration for r in read_jsonl(str(corpus["manifest"]))}
    batches = [[durations[s.record.id] for s in batch] for batch in dataset.batches(0, 0)]
    for pool in range(0, len(batches), 3):  # the batches of a pool cut its sorted clips into intervals
        spans = sorted((min(b), max(b)) for b in batches[pool : pool + 3])
        assert all(high <= low for (_, high), (low, _) in zip(spans, spans[1:]))
    shuffled = [[durations[s.record.id] for s in batch] for batch in datamodule(corpus["pattern"], batch_size=3)
                .train_dataloader().dataset.batches(0, 0)]  # fmt: skip
    spread = lambda bs: np.mean([max(b) - min(b) for b in bs if len(b) > 1])  # noqa: E731
    assert spread(batches) < spread(shuffled)


# --- resume -------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_position_continues_the_epoch_with_its_remaining_batches(tmp_path, corpus, workers):
    """The position of a checkpoint written after step 3 of epoch 1, restored after the loader was built
    and started (Lightning's order with max_epochs): the loader yields epoch 1 after its first 3
    batches, then the whole epoch 2."""
    options = dict(world=2, rank=1, num_workers=workers, batch_size=2, bucket_by_duration=True,
                   bucket_pool_multiplier=2)  # fmt: skip
    whole = datamodule(corpus["pattern"], **options).train_dataloader()
    expected = [epoch_batches(whole, 1), epoch_batches(whole, 2)]
    module = datamodule(corpus["pattern"], **options)
    loader = module.train_dataloader()
    started = iter(loader)
    torch.save({"train_position": [1, 3]}, tmp_path / "state.ckpt")
    module.load_state_dict(torch.load(tmp_path / "state.ckpt", weights_only=True))
    loader.sampler.set_epoch(1)
    assert len(loader) == len(expected[0]) == 7
    assert list(started) == expected[0][3:]
    assert epoch_batches(loader, 2) == expected[1]


def test_the_same_stream_read_from_a_later_step_skips_without_decoding(corpus, monkeypatch):
    dataset = datamodule(corpus["pattern"], batch_size=2, num_workers=2).train_dataloader().dataset
    whole = [clip_ids(dataset[(0, step)]) for step in range(dataset.plan.steps)]
    fresh = datamodule(corpus["pattern"], batch_size=2, num_workers=2).train_dataloader().dataset
    decoded = []
    monkeypatch.setattr(fresh.items, "item", lambda record, index, epoch: decoded.append(record.id) or record.id)
    assert fresh[(0, 5)] == whole[5]  # stream 1, its third batch: two batches read past
    assert decoded == whole[5]
    assert fresh[(0, 1)] == whole[1]  # an earlier batch: the stream is read again from its start


# --- items --------------------------------------------------------------------------------------


def test_audio_from_bytes_decodes_as_from_the_file(tmp_path):
    path = tmp_path / "long.flac"
    sf.write(path, np.random.default_rng(0).standard_normal(3 * 22_050).astype(np.float32) * 0.1, 22_050)
    policy = AudioPolicy(1.0)
    from_file = load_audio(str(path), RATE, policy, True, np.random.default_rng(5))
    from_bytes = load_audio("x.tar:k.flac", RATE, policy, True, np.random.default_rng(5), data=path.read_bytes())
    assert np.array_equal(from_file, from_bytes) and len(from_file) == RATE
    with pytest.raises(AudioDecodeError, match=r"x\.tar:k\.flac") as info:
        load_audio("x.tar:k.flac", RATE, data=b"")
    assert info.value.reason == "empty_file"


def test_items_from_shards_are_the_manifest_clips(corpus):
    records = {r.id: r for r in read_jsonl(str(corpus["manifest"]))}
    module = datamodule(corpus["pattern"])
    module.bind(RATE, list)
    for batch in module.train_dataloader():
        for item in batch:
            record = records[item["clip_id"]]
            assert item["caption_kind"] == "caption" and item["documents"][0].text in record.captions
            assert np.array_equal(item["query"].audio, load_audio(record.audio_path, RATE, AudioPolicy(10.0)))
            assert item["tags"] == record.tags and item["source"].endswith(".tar:" + shard_key(record.id, set()))


# --- bad input ----------------------------------------------------------------------------------

GOOD = {"text": ["a tone"], "duration": 0.3}
BAD_SAMPLES = [
    ("no_json", sample("b", None, wav_bytes()), "missing_member", r"b: sample has no \.json member \(members: b\.wav\)"),
    ("no_audio", sample("b", GOOD, None), "missing_member", r"b: sample has no audio member"),
    ("no_audio_ext", sample("b", GOOD, wav_bytes(), ext="txt"), "missing_member",
     r"b: sample has no audio member \(members: b\.txt, b\.json"),
    ("no_text", sample("b", {"duration": 0.3}, wav_bytes()), "missing_field", r"b: missing 'text'"),
    ("bad_json", sample("b", b"{oops", wav_bytes()), "invalid_json", r"b\.json: invalid JSON"),
    ("list_json", sample("b", b"[1]", wav_bytes()), "not_an_object", r"b\.json: must be a JSON object"),
    ("empty_text", sample("b", {"text": [" "]}, wav_bytes()), "empty_text", r"b: 'text' entries must be"),
    ("bad_duration", sample("b", {"text": "x", "duration": "long"}, wav_bytes()), "wrong_type", r"b\.json: 'duration'"),
    ("bad_audio", sample("b", GOOD, b"RIFF0000garbage"), "unreadable_header", r"b\.wav"),
    ("empty_audio", sample("b", GOOD, b""), "empty_file", r"b\.wav"),
]


def bad_corpus(folder: Path, members: list) -> str:
    """Two shards: good samples a0, a1 | a2, then the bad sample ``b``, then a3."""
    folder.mkdir(parents=True, exist_ok=True)
    good = [sample(f"a{i}", {"text": f"tone {i}", "duration": 0.3}, wav_bytes()) for i in range(4)]
    tar_file(folder / "s-0.tar", good[0] + good[1])
    tar_file(folder / "s-1.tar", good[2] + members + good[3])
    return str(folder / "s-{0..1}.tar")


@pytest.mark.parametrize("name,members,reason,message", BAD_SAMPLES, ids=[case[0] for case in BAD_SAMPLES])
def test_a_bad_sample_is_named_or_counted(tmp_path, name, members, reason, message):
    pattern = bad_corpus(tmp_path, members)
    shard_path = str(tmp_path / "s-1.tar")
    with pytest.raises((ManifestError, AudioDecodeError), match=rf"{shard_path}:{message}") as info:
        list(datamodule(pattern, num_workers=0).train_dataloader())
    assert info.value.reason == reason
    module = datamodule(pattern, on_bad_sample="skip", batch_size=5)
    assert module.skipped_counts("train") == {}
    batches = epoch_batches(module.train_dataloader(), 0)
    assert len(batches) == 1 and sorted(clip for clip in batches[0] if isinstance(clip, str)) == ["a0", "a1", "a2", "a3"]
    markers = [clip for clip in batches[0] if isinstance(clip, SkippedSample)]
    assert [(m.reason, m.source) for m in markers] == [(reason, f"{shard_path}:b")]


def test_an_unreadable_shard_is_named_or_counted_per_lost_sample(tmp_path, corpus):
    folder = tmp_path / "broken"
    make_shards(folder, corpus["manifest"], "--max_count", "5")
    data = (folder / "train-000002.tar").read_bytes()
    (folder / "train-000002.tar").write_bytes(data[: len(data) // 2])  # breaks off inside a member
    (folder / "train-000004.tar").write_bytes(b"not a tar at all" * 64)
    pattern = str(folder / "train-{000000..000005}.tar")
    with pytest.raises(ShardReadError, match=r"train-00000[24]\.tar"):
        list(datamodule(pattern).train_dataloader())
    module = datamodule(pattern, on_bad_sample="skip")
    items = sum(epoch_batches(module.train_dataloader(), 0), [])
    assert len(items) == 26  # the index's count: the lost samples keep their places
    lost = [item for item in items if isinstance(item, SkippedSample)]
    assert all(m.reason == "unreadable_shard" for m in lost)
    assert Counter(Path(m.source).name for m in lost) == {"train-000004.tar": 5, "train-000002.tar": 5 - len(
        list(_readable_prefix(folder / "train-000002.tar")))}  # fmt: skip


def _readable_prefix(path: Path):
    try:
        yield from shard_samples(str(path))
    except ShardReadError:
        return


def test_without_an_index_a_scan_counts_and_reports_a_broken_shard(tmp_path, corpus):
    folder = tmp_path / "scan"
    make_shards(folder, corpus["manifest"], "--max_count", "5")
    (folder / "index.json").unlink()
    (folder / "train-000001.tar").write_bytes(b"")
    pattern = str(folder / "train-{000000..000005}.tar")
    with pytest.raises(ShardReadError, match=r"train-000001\.tar"):
        datamodule(pattern)
    module = datamodule(pattern, on_bad_sample="skip")
    assert [s.samples for s in module.shards()] == [5, 0, 5, 5, 5, 1]
    assert module.skipped_counts("train") == {"unreadable_shard": 1}
    assert len(sum(epoch_batches(module.train_dataloader(), 0), [])) == 21


def test_a_shard_that_disagrees_with_its_index_stops_the_run(tmp_path, corpus):
    folder = tmp_path / "stale"
    make_shards(folder, corpus["manifest"], "--max_count", "5")
    index = json.loads((folder / "index.json").read_text())
    pattern = str(folder / "train-{000000..000005}.tar")
    for count, message in [(4, r"holds more samples than the 4 counted by the index .*index\.json"),
                           (6, r"ends after 5 samples, but the index .*index\.json counts 6")]:
        index["shards"][3]["samples"] = count
        (folder / "index.json").write_text(json.dumps(index))
        with pytest.raises(ManifestError, match=rf"train-000003\.tar: {message}"):
            list(datamodule(pattern, on_bad_sample="skip", batch_size=26).train_dataloader())
    index["shards"] = index["shards"][:3]
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(ManifestError, match=r"train-000003\.tar is not listed in the index"):
        datamodule(pattern)


def test_the_data_module_refuses_a_train_manifest_and_repeated_shards(corpus):
    with pytest.raises(ValueError, match="remove train_manifest"):
        WebDatasetDataModule(train_shards=corpus["pattern"], train_manifest=str(corpus["manifest"]))
    with pytest.raises(ValueError, match="more than once"):
        WebDatasetDataModule(train_shards=[corpus["pattern"], corpus["pattern"]])


# --- training -----------------------------------------------------------------------------------


def test_the_tiny_model_trains_one_epoch_on_shards_through_the_cli(tmp_path, corpus, capsys):
    """configs/demo.yaml on the 26 clips as shards, plus one sample without audio, under ``skip``:
    7 steps of 4 (the last of 3), each trained clip once; the bad sample is reported."""
    folder = tmp_path / "shards"
    make_shards(folder, corpus["manifest"], "--max_count", "5")
    tar_file(folder / "extra.tar", sample("lonely", GOOD, None))
    pattern = f"{folder}/train-{{000000..000005}}.tar::{folder}/extra.tar"
    index = json.loads((folder / "index.json").read_text())
    index["shards"].append({"url": "extra.tar", "samples": 1})
    (folder / "index.json").write_text(json.dumps(index))
    cli = main(["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--data", "WebDatasetDataModule",
                "--data.init_args.train_shards", pattern, "--data.init_args.val_manifest", str(corpus["manifest"]),
                "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "2",
                "--data.init_args.on_bad_sample", "skip", "--trainer.max_epochs", "1",
                "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false",
                "--trainer.num_sanity_val_steps", "0", "--model.warmup_steps", "2", "--test_after_fit", "false",
                "--checkpoint.monitor", "null"])  # fmt: skip
    trainer = cli.trainer
    assert trainer.global_step == 7 and trainer.num_training_batches == 7
    report = next(c for c in trainer.callbacks if isinstance(c, SkippedSampleReport))
    assert report.last["train"] == {"missing_member": 1}
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert "val/t2a/R@1" in trainer.callback_metrics
    assert "skipped samples (train, epoch 0): 1 missing_member" in capsys.readouterr().out


def test_ddp_over_two_processes_with_two_workers_trains_every_sample_once_per_epoch(tmp_path, tmp_path_factory):
    """``main.py fit`` under torchrun: 2 gloo processes, 2 persistent workers each, duration bucketing,
    2 epochs of the 32 demo clips as 7 shards; the clip ids each rank trained, step by step."""
    from dist_scripts.resume_run import batches_of, data_root, jsonl_manifests, shard_pattern

    root = data_root(tmp_path_factory)
    shard_pattern(root)  # made here, not by two racing processes
    out = tmp_path / "ddp"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "dist_scripts" / "resume_run.py"), str(out), "shards", "--data-root", str(root),
               "--checkpoint.monitor", "null", "--trainer.devices", "2", "--trainer.strategy", "ddp",
               "--data.init_args.batch_size", "4"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ranks = [batches_of(out, rank) for rank in (0, 1)]
    ids = [r.id for r in read_jsonl(jsonl_manifests(root)["train"])]
    assert len(ranks[0]) == len(ranks[1]) == 8  # 2 epochs of 4 steps on each process
    for epoch in (0, 1):
        steps = [b for rank in ranks for b in rank[4 * epoch : 4 * epoch + 4]]
        assert Counter(clip for b in steps for clip in b["clip_ids"]) == Counter(ids)
    assert [b["clip_ids"] for b in ranks[0][:4]] != [b["clip_ids"] for b in ranks[0][4:]]
