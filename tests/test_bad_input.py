"""Dirty data: every kind of bad row and bad audio file, under ``on_bad_sample`` error and skip.

The corpus is generated here (soundfile writes into ``tmp_path``): audio in every bit depth, channel
count and rate the loader must decode, broken files of every kind, and manifests with every kind of
bad row.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import soundfile as sf
import torch

from callbacks import SkippedSampleReport
from datamodules import AudioDecodeError, AudioPolicy, ManifestError, RetrievalDataModule, SkippedSample
from datamodules.audio import audio_duration, load_audio
from datamodules.bad_samples import REASONS
from datamodules.check import main as check_data
from datamodules.datasets import EvalDataset
from datamodules.manifest import read_json_list, read_jsonl, screen_audio
from lightning_modules.backbones.qwen_omni import AUDIO_TOKEN
from datamodules.collate import PairCollator
from datamodules.inputs import EmbedInput
from main import main

RATE = 16_000


def _tone(rate: int, seconds: float, hz: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * hz * np.arange(round(rate * seconds)) / rate)


def _dominant_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


# --- broken files -------------------------------------------------------------------------------


def _wav_extensible(path: Path, subformat: int) -> None:
    """A well-formed WAVE_FORMAT_EXTENSIBLE header whose codec GUID is ``subformat`` (0x92: Dolby AC-3)."""
    guid = struct.pack("<IHH", subformat, 0, 0x10) + bytes([0x80, 0, 0, 0xAA, 0, 0x38, 0x9B, 0x71])
    fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 1, RATE, 2 * RATE, 2, 16, 22, 16, 4) + guid
    data = b"\x00\x01" * 1600
    body = b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def _truncated_flac(path: Path) -> None:
    sf.write(path, _tone(RATE, 1.0), RATE, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_header(path: Path) -> None:
    sf.write(path, _tone(RATE, 0.5), RATE, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[:12] + b"garbage!" * 8 + data[76:])  # RIFF/WAVE, then no valid chunk


def _non_finite(value: float):
    def write(path: Path) -> None:
        wave = _tone(RATE, 0.5).astype(np.float32)
        wave[1000] = value
        sf.write(path, wave, RATE, subtype="FLOAT")

    return write


#: (file name, writer, reason, found by reading the header (True) or only by decoding (False)).
BAD_AUDIO = [
    ("zero_bytes.wav", lambda p: p.write_bytes(b""), "empty_file", True),
    ("corrupt_header.wav", _corrupt_header, "unreadable_header", True),
    ("random.m4a", lambda p: p.write_bytes(np.random.default_rng(0).bytes(4000)), "unsupported_format", True),
    ("ac3_in_wav.wav", lambda p: _wav_extensible(p, 0x92), "unsupported_format", True),
    ("no_frames.wav", lambda p: sf.write(p, np.zeros(0, np.float32), RATE), "no_samples", True),
    ("truncated.flac", _truncated_flac, "decode_error", False),
    ("nan.wav", _non_finite(np.nan), "non_finite", False),
    ("inf.wav", _non_finite(np.inf), "non_finite", False),
]


@pytest.mark.parametrize("name,write,reason,in_header", BAD_AUDIO, ids=[case[0] for case in BAD_AUDIO])
def test_bad_audio_is_named_with_its_reason(tmp_path, name, write, reason, in_header):
    path = tmp_path / name
    write(path)
    if in_header:
        with pytest.raises(AudioDecodeError, match=name) as info:
            audio_duration(str(path))
        assert info.value.reason == reason
    else:
        assert audio_duration(str(path)) > 0
    with pytest.raises(AudioDecodeError, match=name) as info:
        load_audio(str(path), RATE, AudioPolicy(10.0), train=False)
    assert info.value.reason == reason and info.value.path == str(path)


# --- what decodes, and to what ------------------------------------------------------------------


@pytest.mark.parametrize(
    "ext,subtype,atol",
    [
        ("wav", "PCM_U8", 2**-7),
        ("wav", "PCM_16", 2**-15),
        ("wav", "PCM_24", 2**-23),
        ("wav", "FLOAT", 1e-7),
        ("flac", "PCM_16", 2**-15),
        ("flac", "PCM_24", 2**-23),
    ],
)
def test_bit_depths_decode_to_the_signal(tmp_path, ext, subtype, atol):
    signal = _tone(RATE, 0.25)
    path = tmp_path / f"tone_{subtype}.{ext}"
    sf.write(path, signal, RATE, subtype=subtype)
    wave = load_audio(str(path), RATE)
    assert wave.dtype == np.float32 and wave.shape == signal.shape
    np.testing.assert_allclose(wave, signal, atol=atol, rtol=0)


@pytest.mark.parametrize("channels", [1, 2, 6])
def test_channels_are_averaged_to_mono(tmp_path, channels):
    gains = np.linspace(0.1, 0.6, channels)
    data = np.stack([g * _tone(RATE, 0.25, hz=200.0 * (k + 1), amplitude=1.0) for k, g in enumerate(gains)], axis=1)
    path = tmp_path / f"{channels}ch.wav"
    sf.write(path, data, RATE, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(str(path), RATE), data.mean(axis=1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000, 96000])
def test_rates_are_resampled_to_16k(tmp_path, rate):
    path = tmp_path / f"tone_{rate}.wav"
    sf.write(path, _tone(rate, 1.0, hz=1000.0), rate, subtype="FLOAT")
    wave = load_audio(str(path), RATE)
    assert abs(len(wave) - RATE) <= 1
    assert _dominant_hz(wave, RATE) == pytest.approx(1000.0, abs=1.0)
    middle = wave[1000:-1000]  # away from the resampler's edges
    assert np.sqrt(2) * np.sqrt(np.mean(middle.astype(np.float64) ** 2)) == pytest.approx(0.5, rel=0.01)
    reference = _tone(RATE, 1.0, hz=1000.0)[: len(wave)][1000:-1000]
    assert np.corrcoef(middle, reference)[0, 1] > 0.9999


def test_silent_and_10ms_clips_are_valid(tmp_path):
    silent, short = tmp_path / "silent.wav", tmp_path / "short.wav"
    sf.write(silent, np.zeros(RATE, np.float32), RATE)
    sf.write(short, _tone(44_100, 0.01), 44_100, subtype="FLOAT")  # 441 frames
    np.testing.assert_array_equal(load_audio(str(silent), RATE), np.zeros(RATE, np.float32))
    assert len(load_audio(str(short), RATE)) == 160
    assert audio_duration(str(short)) == pytest.approx(0.01)


def test_10ms_clip_gets_an_audio_token_and_a_finite_embedding(tiny_module):
    module = tiny_module()
    collator = module.backbone.collator()
    audio_id = collator.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    ten_ms = _tone(RATE, 0.01).astype(np.float32)
    for clips in ([ten_ms], [ten_ms, _tone(RATE, 1.0).astype(np.float32)]):
        batch = module.collate(
            [{"query": EmbedInput(audio=clip), "documents": [EmbedInput(text="a tone")], "clip_index": i}
             for i, clip in enumerate(clips)]  # fmt: skip
        )
        assert ((batch["query"]["input_ids"] == audio_id).sum(-1) >= 1).all()
        with torch.no_grad():
            query, _ = module.embed_batch(batch)
        assert torch.isfinite(query).all()


# --- seeking crop -------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [16000, 44100])
@pytest.mark.parametrize("train", [False, True])
def test_clips_shorter_than_the_max_load_as_a_whole_decode_would(tmp_path, rate, train):
    path = tmp_path / "clip.flac"
    sf.write(path, _tone(rate, 1.5), rate)
    policy = AudioPolicy(max_seconds=2.0, min_seconds=1.8)
    whole = policy.apply(load_audio(str(path), RATE), RATE, train, np.random.default_rng(0))
    np.testing.assert_array_equal(load_audio(str(path), RATE, policy, train, np.random.default_rng(0)), whole)


def test_same_rate_crops_equal_the_in_memory_crop(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, np.random.default_rng(1).uniform(-0.5, 0.5, 5 * RATE), RATE, subtype="FLOAT")
    policy = AudioPolicy(max_seconds=2.0)
    for seed in range(5):
        expected = policy.apply(load_audio(str(path), RATE), RATE, True, np.random.default_rng(seed))
        np.testing.assert_array_equal(load_audio(str(path), RATE, policy, True, np.random.default_rng(seed)), expected)


@pytest.mark.parametrize("rate", [22050, 48000])
def test_resampled_crops_have_the_policy_length(tmp_path, rate):
    path = tmp_path / "long.wav"
    sf.write(path, _tone(rate, 7.3, hz=1000.0), rate, subtype="FLOAT")
    policy = AudioPolicy(max_seconds=2.0)
    for seed in range(5):
        wave = load_audio(str(path), RATE, policy, True, np.random.default_rng(seed))
        assert len(wave) == 2 * RATE
        assert _dominant_hz(wave, RATE) == pytest.approx(1000.0, abs=1.0)
    # The head crop is the head of the whole resampled clip, to the bit.
    np.testing.assert_array_equal(load_audio(str(path), RATE, policy), load_audio(str(path), RATE)[: 2 * RATE])


def test_two_hour_clip_is_cropped_by_seeking(tmp_path):
    rate, frames, block = 8000, 2 * 3600 * 8000, 600 * 8000

    def signal(start: int, stop: int) -> np.ndarray:  # no two 10 s windows are alike
        n = np.arange(start, stop)
        return 0.4 * np.sin(2 * np.pi * 1000.3 * n / rate) + 0.1 * np.sin(2 * np.pi * n / frames)

    path = tmp_path / "two_hours.wav"
    try:
        with sf.SoundFile(path, "w", rate, 1, "PCM_16") as handle:
            for start in range(0, frames, block):
                handle.write(signal(start, start + block))
        assert path.stat().st_size > 100 * 2**20
        policy = AudioPolicy(max_seconds=10.0)
        tracemalloc.start()
        try:
            cropped = load_audio(str(path), rate, policy, train=True, rng=np.random.default_rng(7))
            resampled = load_audio(str(path), RATE, policy, train=True, rng=np.random.default_rng(8))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < frames * 4 / 100  # a whole-file float32 decode is 230 MB; the crops take ~1 MB
        start = int(np.random.default_rng(7).integers(0, frames - 10 * rate + 1))
        assert start > 0
        np.testing.assert_allclose(cropped, signal(start, start + 10 * rate), atol=2**-14, rtol=0)
        assert len(resampled) == 10 * RATE and _dominant_hz(resampled, RATE) == pytest.approx(1000.3, abs=0.2)
        head = load_audio(str(path), rate, policy, train=False)
        np.testing.assert_allclose(head, signal(0, 10 * rate), atol=2**-14, rtol=0)
    finally:
        path.unlink(missing_ok=True)


# --- manifests ----------------------------------------------------------------------------------


@pytest.fixture
def clips(tmp_path):
    for name in ("a.wav", "b.wav", "c.wav"):
        (tmp_path / "clips").mkdir(exist_ok=True)
        sf.write(tmp_path / "clips" / name, _tone(RATE, 0.2), RATE)
    return tmp_path / "clips"


GOOD_1 = {"audio": "clips/a.wav", "caption": "first", "id": "one"}
GOOD_2 = {"audio": "clips/c.wav", "caption": "second", "id": "two"}

#: (reason, bad JSONL row (a string is written as it is), fragment of the error message).
MANIFEST_CASES = [
    ("invalid_json", '{"audio": "clips/b.wav", "caption": "unterminated', "invalid JSON"),
    ("not_an_object", '["not", "an", "object"]', "JSON object"),
    ("missing_field", {"caption": "no audio"}, "missing 'audio'"),
    ("missing_field", {"audio": "", "caption": "x"}, "missing 'audio'"),
    ("missing_field", {"audio": "clips/b.wav"}, "missing 'caption'"),
    ("missing_field", {"audio": "clips/b.wav", "question": "Why?"}, "missing 'caption'"),
    ("wrong_type", {"audio": 5, "caption": "x"}, "'audio'"),
    ("wrong_type", {"audio": "clips/b.wav", "caption": 3}, "'caption'"),
    ("wrong_type", {"audio": "clips/b.wav", "caption": ["ok", 3]}, "'caption'"),
    ("wrong_type", {"audio": "clips/b.wav", "caption": "x", "tags": {"dog": 1}}, "'tags'"),
    ("wrong_type", {"audio": "clips/b.wav", "caption": "x", "id": 7}, "clip id"),
    ("wrong_type", {"audio": "clips/b.wav", "question": ["Why?"], "answer": "x"}, "'question'"),
    ("empty_text", {"audio": "clips/b.wav", "caption": ""}, "'caption'"),
    ("empty_text", {"audio": "clips/b.wav", "caption": "   "}, "'caption'"),
    ("empty_text", {"audio": "clips/b.wav", "caption": []}, "'caption'"),
    ("empty_text", {"audio": "clips/b.wav", "caption": ["ok", " "]}, "'caption'"),
    ("empty_text", {"audio": "clips/b.wav", "question": "Why?", "answer": ""}, "'answer'"),
    ("missing_file", {"audio": "clips/missing.wav", "caption": "x"}, "missing.wav"),
    ("duplicate_id", {"audio": "clips/b.wav", "caption": "x", "id": "one"}, "duplicate clip id 'one'"),
]


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("reason,row,fragment", MANIFEST_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(MANIFEST_CASES)])
def test_bad_jsonl_row_under_error_and_skip(clips, tmp_path, reason, row, fragment):
    path = _jsonl(tmp_path / "m.jsonl", [GOOD_1, "", row, GOOD_2])
    with pytest.raises(ManifestError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: ") and fragment in str(info.value)
    assert info.value.reason == reason
    if isinstance(row, dict) and isinstance(row.get("audio"), str) and row["audio"]:
        assert str(clips.parent / row["audio"]) in str(info.value)  # names the audio file

    problems: list[SkippedSample] = []
    records = read_jsonl(path, problems)
    assert [r.id for r in records] == ["one", "two"]
    assert [(p.reason, p.source) for p in problems] == [(reason, f"{path}:3")]


#: (reason, bad JSON-list entry).
LIST_CASES = [
    ("not_an_object", "b"),
    ("missing_field", {"caption": ["x"]}),
    ("wrong_type", {"video_id": 5, "caption": ["x"]}),
    ("wrong_type", {"video_id": "b", "caption": {"text": "x"}}),
    ("empty_text", {"video_id": "b", "caption": ["x", ""]}),
    ("missing_field", {"video_id": "b"}),
    ("missing_file", {"video_id": "zzz", "caption": ["x"]}),
    ("duplicate_id", {"video_id": "a", "caption": ["again"]}),
]


@pytest.mark.parametrize("reason,entry", LIST_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(LIST_CASES)])
def test_bad_json_list_entry_under_error_and_skip(clips, tmp_path, reason, entry):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"video_id": "a", "caption": ["x"]}, entry, {"video_id": "c", "caption": ["y"]}]))
    with pytest.raises(ManifestError, match=rf"{path}:entry 1: ") as info:
        read_json_list(str(path), str(clips))
    assert info.value.reason == reason
    problems: list[SkippedSample] = []
    assert [r.id for r in read_json_list(str(path), str(clips), problems)] == ["a", "c"]
    assert [(p.reason, p.source) for p in problems] == [(reason, f"{path}:entry 1")]


def test_a_file_that_does_not_parse_raises_even_when_collecting(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"video_id": "a",')
    with pytest.raises(ManifestError, match="invalid JSON"):
        read_json_list(str(path), problems=[])


def test_one_dirty_manifest_keeps_its_good_rows_in_order(clips, tmp_path):
    rows = [GOOD_1] + [row for _, row, _ in MANIFEST_CASES] + [GOOD_2]
    problems: list[SkippedSample] = []
    records = read_jsonl(_jsonl(tmp_path / "m.jsonl", rows), problems)
    assert [r.id for r in records] == ["one", "two"]
    assert [p.reason for p in problems] == [reason for reason, _, _ in MANIFEST_CASES]
    assert [p.source.rsplit(":", 1)[1] for p in problems] == [str(i) for i in range(2, len(rows))]


# --- a dirty corpus through the data module, the collator and the module -----------------------


def _dirty_corpus(root: Path) -> dict[str, str]:
    """Train and val manifests over good, silent, 10 ms and every kind of bad audio, plus bad rows."""
    audio = root / "audio"
    audio.mkdir()
    (root / "clips").mkdir()
    sf.write(root / "clips" / "b.wav", _tone(RATE, 0.2), RATE)  # the file MANIFEST_CASES rows point at
    good = []
    for i in range(3):
        sf.write(audio / f"good{i}.wav", _tone(RATE, 0.3, hz=300.0 * (i + 1)), RATE)
        good.append(f"good{i}.wav")
    sf.write(audio / "silent.wav", np.zeros(RATE // 4, np.float32), RATE)
    sf.write(audio / "short.wav", _tone(RATE, 0.01), RATE)
    for name, write, _, _ in BAD_AUDIO:
        write(audio / name)
    rows = [{"audio": f"audio/{n}", "caption": f"clip {n}", "id": n} for n in good + ["silent.wav", "short.wav"]]
    rows += [{"audio": f"audio/{name}", "caption": f"bad {name}", "id": name} for name, *_ in BAD_AUDIO]
    rows += [row for _, row, _ in MANIFEST_CASES if not (isinstance(row, dict) and row.get("id") == "one")]
    rows.append({"audio": "audio/good0.wav", "caption": "again", "id": "good0.wav"})  # duplicate id
    val = [{"audio": f"audio/{n}", "caption": [f"clip {n}", "a sound"], "id": n} for n in good]
    val.append({"audio": "audio/nan.wav", "caption": "bad", "id": "nan"})
    return {"train": _jsonl(root / "train.jsonl", rows), "val": _jsonl(root / "val.jsonl", val)}


def _expected_setup_counts() -> dict[str, int]:
    counts: dict[str, int] = {}
    reasons = [r for r, row, _ in MANIFEST_CASES if not (isinstance(row, dict) and row.get("id") == "one")]
    reasons += ["duplicate_id"] + [reason for _, _, reason, in_header in BAD_AUDIO if in_header]
    for reason in reasons:
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def test_datamodule_error_policy_names_row_and_file(tmp_path):
    paths = _dirty_corpus(tmp_path)
    datamodule = RetrievalDataModule(train_manifest=paths["train"])
    with pytest.raises(ManifestError, match=rf"{paths['train']}:\d+: "):
        datamodule.setup("fit")
    # With the manifest clean, the first broken header stops setup, naming the row and the file.
    rows = [json.loads(line) for line in Path(paths["train"]).read_text().splitlines()[:6]]
    manifest = _jsonl(tmp_path / "headers.jsonl", rows)
    with pytest.raises(AudioDecodeError, match=rf"{manifest}:6: .*zero_bytes\.wav") as info:
        RetrievalDataModule(train_manifest=manifest).setup("fit")
    assert info.value.reason == "empty_file"
    # Decode-time problems stop the data set when the clip is loaded.
    records, _ = screen_audio(read_jsonl(paths["val"]))
    dataset = EvalDataset(records, RATE, AudioPolicy(10.0))
    with pytest.raises(AudioDecodeError, match=rf"{paths['val']}:4: .*nan\.wav") as info:
        dataset[3]
    assert info.value.reason == "non_finite"


class _CountingCollator:
    """A backbone collator stand-in that only counts its inputs (and cuts no text)."""

    def truncate(self, items):
        return list(items), 0

    def __call__(self, items):
        return {"n": len(items)}


def test_datamodule_skip_policy_counts_and_drops(tmp_path):
    paths = _dirty_corpus(tmp_path)
    datamodule = RetrievalDataModule(
        train_manifest=paths["train"], val_manifest=paths["val"], batch_size=3, on_bad_sample="skip"
    )
    datamodule.setup("fit")
    ids = [r.id for r in datamodule.records["train"]]
    assert ids == ["good0.wav", "good1.wav", "good2.wav", "silent.wav", "short.wav", "truncated.flac", "nan.wav",
                   "inf.wav"]  # fmt: skip
    assert datamodule.skipped_counts("train") == _expected_setup_counts()
    assert datamodule.skipped_counts("val") == {}

    datamodule.bind(RATE, PairCollator(_CountingCollator()))
    loaded, skipped = 0, {}
    for batch in datamodule.train_dataloader():  # batches of 3 that lose their bad clips
        for reason, count in batch["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
        if batch.get("empty"):
            assert set(batch) == {"empty", "skipped"}
        else:
            assert batch["query"]["n"] == len(batch["clip_ids"]) == len(batch["query_index"])
            assert not set(batch["clip_ids"]) & {"truncated.flac", "nan.wav", "inf.wav"}
            loaded += len(batch["clip_ids"])
    assert loaded + sum(skipped.values()) == 6  # drop_last leaves 2 of the 8 clips out
    loaders = datamodule.val_dataloader()
    val = list(loaders[0] if isinstance(loaders, list) else loaders)
    assert sum(len(b.get("clip_ids", [])) for b in val) == 3
    assert sum(b["skipped"].get("non_finite", 0) for b in val) == 1


def test_collator_flags_a_batch_whose_samples_were_all_skipped():
    collate = PairCollator(_CountingCollator())
    markers = [SkippedSample("decode_error", "m.jsonl:1", "a.flac"), SkippedSample("non_finite", "m.jsonl:2", "b.wav")]
    assert collate(markers) == {"empty": True, "skipped": {"decode_error": 1, "non_finite": 1}}
    with pytest.raises(ValueError, match="unknown bad-sample reason"):
        SkippedSample("bad_vibes", "m.jsonl:1")
    assert len(set(REASONS)) == len(REASONS) == 15


def _write_config(root: Path, paths: dict[str, str], **data: object) -> str:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root)},
        "model": {"backbone": {"class_path": "QwenOmniThinker", "init_args": {"tiny": True}},
                  "pooler": {"class_path": "EmbTokenPooler"}},
        "data": {"class_path": "RetrievalDataModule",
                 "init_args": {"train_manifest": paths["train"], "val_manifest": paths["val"], "batch_size": 1,
                               "eval_batch_size": 2, **data}},
    }  # fmt: skip
    path = root / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return str(path)


def test_fit_skips_bad_clips_and_reports_them(tmp_path, capsys):
    """Batches of one clip: every bad clip empties its batch, which trains nothing and crashes nothing."""
    paths = _dirty_corpus(tmp_path)
    config = _write_config(tmp_path, paths, on_bad_sample="skip")
    cli = main(["fit", "--config", config, "--checkpoint.monitor", "null"])
    report = next(c for c in cli.trainer.callbacks if isinstance(c, SkippedSampleReport))
    expected = dict(_expected_setup_counts(), decode_error=1, non_finite=2)
    assert report.last["train"] == expected
    assert report.last["val"] == {"non_finite": 1}
    metrics = cli.trainer.callback_metrics
    assert metrics["data/skipped/train/non_finite"] == 2 and metrics["data/skipped/val/total"] == 1
    assert metrics["data/skipped/train/total"] == sum(expected.values())
    # Only the 5 valid clips (silent and 10 ms included) moved the weights: empty batches skip the step.
    optimizer = cli.trainer.optimizers[0]
    assert {int(optimizer.state[p]["step"]) for group in optimizer.param_groups for p in group["params"]} == {5}
    out = capsys.readouterr().out
    in_setup = sum(_expected_setup_counts().values())
    assert "skipped samples (train, epoch 0): " in out and f"[{in_setup} in setup, 3 while loading]" in out


# --- check-data ---------------------------------------------------------------------------------


def test_check_data_reports_every_problem(tmp_path, capsys):
    paths = _dirty_corpus(tmp_path)
    config = _write_config(tmp_path, paths)
    # A model section that could never be built: check-data must not try.
    text = json.loads(Path(config).read_text())
    text["model"]["backbone"] = {"class_path": "NoSuchBackbone", "init_args": {"name_or_path": "7B"}}
    Path(config).write_text(json.dumps(text))

    assert check_data(["--config", config, "--max_problems", "100"]) == 1
    out = capsys.readouterr().out
    counts = _expected_setup_counts()
    train = paths["train"]
    rows = len(Path(train).read_text().splitlines())
    assert f"{'train':<12} {rows:>8} {8:>8}  " in out  # the clips that fail only when decoded pass
    assert f"{'val':<12} {4:>8} {4:>8}  none  ({paths['val']})" in out
    for reason, count in counts.items():
        assert f" {count} {reason}" in out
    assert f"{train}:6  empty_file  {tmp_path / 'audio' / 'zero_bytes.wav'}  audio file is empty" in out
    assert f"{train}:10  no_samples  " in out and f"{train}:14  invalid_json  -  invalid JSON" in out
    assert f"{train}:5  short_clip  {tmp_path / 'audio' / 'short.wav'}  0.010 s" in out
    assert f"result: {sum(counts.values())} problems" in out
    with pytest.raises(SystemExit) as info:
        main(["check-data", "--config", config])
    assert info.value.code == 1


def test_check_data_passes_clean_data_with_overlays_and_short_names(tmp_path, capsys):
    base = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(json.dumps({"data": {"init_args": {"root": str(tmp_path / "synthetic"), "num_train": 6,
                                                          "num_val": 3, "num_test": 3}}}))  # fmt: skip
    assert check_data(["--config", str(base), "--config", str(overlay)]) == 0
    out = capsys.readouterr().out
    assert "predict: same manifest as test" in out and out.rstrip().endswith("result: no problems")
    assert f"{'train':<12} {6:>8} {6:>8}  none" in out


def test_check_data_takes_data_overrides_like_fit(tmp_path, capsys):
    """``--data.*`` settings override the configs, as in ``fit``; other settings are refused."""
    paths = _dirty_corpus(tmp_path)
    config = _write_config(tmp_path, paths)
    clean = tmp_path / "clean.jsonl"
    clean.write_text(Path(paths["val"]).read_text())  # the val rows are all fine; paths are absolute
    with pytest.raises(SystemExit) as info:
        main(["check-data", "--config", config, "--data.init_args.train_manifest", str(clean)])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"{'train':<12} {4:>8} {4:>8}  none  ({clean})" in out
    with pytest.raises(SystemExit) as info:
        main(["check-data", "--config", config, "--model.learning_rate", "1"])
    assert info.value.code == 2


def test_check_data_on_a_recipe_without_its_data(capsys):
    recipe = Path(__file__).resolve().parent.parent / "configs" / "aurola.yaml"  # a 3B model: never built here
    assert check_data(["--config", str(recipe)]) == 1
    assert "manifest not found" in capsys.readouterr().out



class RankSkips(pl.LightningModule):
    """A model-less module whose every batch reports ``rank + 1`` clips that failed to decode and
    ``rank + 1`` documents whose text was cut."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def train_dataloader(self):
        counts = self.global_rank + 1
        batches = [{"x": torch.ones(1), "skipped": {"decode_error": counts}, "truncated": {"document": counts}}] * 3
        return torch.utils.data.DataLoader(batches, batch_size=None)

    def training_step(self, batch, batch_idx):
        return (self.weight * batch["x"]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow  # two spawned processes: about 12 s
def test_report_sums_the_ranks(tmp_path):
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                         use_distributed_sampler=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[SkippedSampleReport()], default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(RankSkips())
    assert trainer.callback_metrics["data/skipped/train/decode_error"] == 3 * (1 + 2)
    assert trainer.callback_metrics["data/truncated/train/document"] == 3 * (1 + 2)
