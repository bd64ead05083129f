"""Manifest parsing: both formats, path resolution and the error messages."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import soundfile as sf

from datamodules.eval_sets import HardNegative, read_hard_negatives
from datamodules.manifest import (
    ClipRecord,
    ManifestError,
    open_manifest,
    read_json_list,
    read_jsonl,
    read_manifest,
)


def _touch_audio(path) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, np.zeros(160, dtype=np.float32), 16000)
    return str(path)


def _write_lines(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def audio_root(tmp_path):
    for name in ("a.wav", "b.wav", "c.flac"):
        _touch_audio(tmp_path / "clips" / name)
    return tmp_path


def test_jsonl_rows(audio_root, tmp_path):
    absolute = _touch_audio(tmp_path / "elsewhere" / "abs.wav")
    rows = [
        json.dumps({"audio": "clips/a.wav", "caption": ["a dog barks", "barking"], "id": "a", "tags": "dog, bark"}),
        "",
        json.dumps({"audio": "clips/b.wav", "caption": "rain", "caption_long": "steady rain on a roof"}),
        "   ",
        json.dumps({"audio": absolute, "question": "What is it?", "answer": "rain", "choices": ["rain", "wind"]}),
    ]
    path = _write_lines(tmp_path / "m.jsonl", rows)

    records = read_jsonl(path)

    assert [r.id for r in records] == ["a", "clips/b.wav", absolute]
    assert records[0].audio_path == str(audio_root / "clips" / "a.wav")
    assert records[0].captions == ["a dog barks", "barking"]
    assert records[0].tags == ["dog", "bark"]
    assert records[0].texts("tags") == ["dog, bark"]
    assert records[1].captions == ["rain"]
    assert records[1].texts("caption_long") == ["steady rain on a roof"]
    assert records[1].texts("caption_short") == []
    assert records[1].source == f"{path}:3"
    assert records[2].audio_path == absolute and records[2].is_qa and records[2].captions == []
    assert records[2].extra["choices"] == ["rain", "wind"]


def test_paths_are_relative_to_the_manifest_not_the_cwd(audio_root, monkeypatch, tmp_path):
    path = _write_lines(tmp_path / "m.jsonl", [json.dumps({"audio": "clips/a.wav", "caption": "x"})])
    monkeypatch.chdir(tmp_path / "clips")
    assert read_manifest(path)[0].audio_path == str(audio_root / "clips" / "a.wav")


GOOD = json.dumps({"audio": "clips/a.wav", "caption": "fine", "id": "one"})


@pytest.mark.parametrize(
    "bad_row,expected",
    [
        ('{"audio": "clips/b.wav", "caption": "unterminated', "invalid JSON"),
        ('["not", "an", "object"]', "JSON object"),
        (json.dumps({"caption": "no audio"}), "missing 'audio'"),
        (json.dumps({"audio": "clips/b.wav"}), "missing 'caption'"),
        (json.dumps({"audio": "clips/b.wav", "caption": ""}), "caption"),
        (json.dumps({"audio": "clips/b.wav", "caption": "   "}), "caption"),
        (json.dumps({"audio": "clips/b.wav", "caption": []}), "caption"),
        (json.dumps({"audio": "clips/b.wav", "caption": ["ok", 3]}), "caption"),
        (json.dumps({"audio": "clips/b.wav", "question": "Why?"}), "missing 'caption'"),
        (json.dumps({"audio": "clips/b.wav", "question": "Why?", "answer": ""}), "answer"),
        (json.dumps({"audio": "clips/b.wav", "caption": "x", "tags": [1, 2]}), "tags"),
        (json.dumps({"audio": "clips/missing.wav", "caption": "x"}), "missing.wav"),
        (json.dumps({"audio": "clips/b.wav", "caption": "x", "id": "one"}), "duplicate clip id 'one'"),
        (json.dumps({"audio": "clips/b.wav", "label": ""}), "'label' must be a non-empty string"),
        (json.dumps({"audio": "clips/b.wav", "label": ["dog"]}), "'label' must be a non-empty string"),
        (json.dumps({"audio": "clips/b.wav", "labels": []}), "'labels' must be a non-empty string or"),
        (json.dumps({"audio": "clips/b.wav", "caption": "x", "query_type": [1]}), "'query_type' entries"),
    ],
)
def test_jsonl_errors_name_manifest_and_line(audio_root, tmp_path, bad_row, expected):
    path = _write_lines(tmp_path / "bad.jsonl", [GOOD, "", bad_row])
    with pytest.raises(ManifestError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert f"{path}:3" in message
    assert expected in message
    assert isinstance(info.value, ValueError)


def test_missing_audio_error_names_the_file(audio_root, tmp_path):
    path = _write_lines(tmp_path / "m.jsonl", [json.dumps({"audio": "clips/gone.flac", "caption": "x"})])
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: audio file not found: .*clips/gone\.flac"):
        read_jsonl(path)


def test_json_list_resolves_missing_extensions(audio_root, tmp_path):
    _touch_audio(tmp_path / "clips" / "Yabc_30.000.wav")  # AudioCaps-like names contain dots
    entries = [
        {"video_id": "a", "caption": ["one", "two", "three", "four", "five"]},
        {"id": "c", "caption": ["x"] * 5},
        {"video_id": "b.wav", "caption": "single"},
        {"video_id": "Yabc_30.000", "caption": ["y"], "tags": "t1,t2"},
    ]
    path = tmp_path / "annotations" / "test.json"
    path.parent.mkdir()
    path.write_text(json.dumps(entries))

    records = read_manifest(str(path), audio_dir=str(audio_root / "clips"))

    assert [os.path.basename(r.audio_path) for r in records] == ["a.wav", "c.flac", "b.wav", "Yabc_30.000.wav"]
    assert [r.id for r in records] == ["a", "c", "b.wav", "Yabc_30.000"]
    assert len(records[0].captions) == 5
    assert records[2].captions == ["single"]
    assert records[3].tags == ["t1", "t2"]
    assert records[1].source == f"{path}:entry 1"


def test_json_list_accepts_data_wrapper_and_defaults_audio_dir(audio_root, tmp_path):
    path = tmp_path / "clips" / "list.json"
    path.write_text(json.dumps({"data": [{"id": "a", "caption": ["z"]}]}))
    assert read_json_list(str(path))[0].audio_path == str(audio_root / "clips" / "a.wav")


@pytest.mark.parametrize(
    "bad_entry,expected",
    [
        ({"video_id": "zzz", "caption": ["x"]}, "zzz.flac"),  # lists the names tried
        ({"caption": ["x"]}, "'video_id' or 'id'"),
        ({"video_id": "b", "caption": []}, "caption"),
        ({"video_id": "b"}, "missing 'caption'"),
        ({"video_id": "a", "caption": ["dup"]}, "duplicate clip id 'a'"),
    ],
)
def test_json_list_errors_name_manifest_and_entry(audio_root, tmp_path, bad_entry, expected):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"video_id": "a", "caption": ["ok"]}, bad_entry]))
    with pytest.raises(ManifestError) as info:
        read_json_list(str(path), audio_dir=str(audio_root / "clips"))
    assert f"{path}:entry 1" in str(info.value)
    assert expected in str(info.value)


def test_json_list_invalid_json_gives_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"video_id": "a",\n  "caption": [}\n]')
    with pytest.raises(ManifestError, match=rf"{path}:3"):
        read_json_list(str(path))


def test_read_manifest_rejects_unknown_or_missing(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("audio,caption\n")
    with pytest.raises(ManifestError, match="m.csv"):
        read_manifest(str(csv))
    with pytest.raises(ManifestError, match="nothere.jsonl"):
        read_manifest(str(tmp_path / "nothere.jsonl"))


def test_record_texts_for_unknown_field():
    record = ClipRecord(id="x", audio_path="x.wav", captions=["c"], extra={"caption_short": ["s1", "s2"]})
    assert record.texts("caption_short") == ["s1", "s2"]
    assert record.texts("nothing") == [] and record.tags == [] and not record.is_qa


BOM = "\ufeff"  # encoded as EF BB BF, as Windows tools and spreadsheets start UTF-8 files


def test_a_leading_byte_order_mark_is_accepted(audio_root, tmp_path):
    """Every format, written with a BOM, reads as without one: the same records, the first field's
    name intact; a BOM past the start is still a bad row."""
    rows = [json.dumps({"id": "a", "audio": "clips/a.wav", "caption": "a dog barks"}),
            json.dumps({"id": "b", "audio": "clips/b.wav", "caption": "rain"})]  # fmt: skip
    plain, marked = tmp_path / "plain.jsonl", tmp_path / "marked.jsonl"
    plain.write_text("\n".join(rows) + "\n", encoding="utf-8")
    marked.write_bytes((BOM + "\n".join(rows) + "\n").encode("utf-8"))
    assert marked.read_bytes()[:3] == b"\xef\xbb\xbf"
    with pytest.raises(json.JSONDecodeError, match="BOM"):
        json.loads(marked.read_text(encoding="utf-8").splitlines()[0])  # what a plain UTF-8 read gives
    assert read_manifest(str(marked)) == [
        ClipRecord(r.id, r.audio_path, r.captions, r.extra, r.source.replace("plain", "marked"))
        for r in read_manifest(str(plain))
    ]

    entries = tmp_path / "list.json"
    entries.write_bytes((BOM + json.dumps([{"video_id": "a", "caption": ["one", "two"]}])).encode("utf-8"))
    assert [r.captions for r in read_json_list(str(entries), str(audio_root / "clips"))] == [["one", "two"]]

    table = tmp_path / "clotho_captions_evaluation.csv"
    table.write_bytes((BOM + "file_name,caption_1\r\na.wav,\"a dog, barking\"\r\n").encode("utf-8"))
    with open_manifest(str(table), newline="") as handle:
        assert list(csv.DictReader(handle)) == [{"file_name": "a.wav", "caption_1": "a dog, barking"}]

    inner = tmp_path / "inner.jsonl"
    inner.write_bytes((rows[0] + "\n" + BOM + rows[1] + "\n").encode("utf-8"))
    with pytest.raises(ManifestError, match=rf"{inner}:2: invalid JSON") as info:
        read_manifest(str(inner))
    assert info.value.reason == "invalid_json"


def test_hard_negative_files_accept_a_byte_order_mark(audio_root, tmp_path):
    manifest = _write_lines(tmp_path / "m.jsonl", [json.dumps({"id": i, "audio": f"clips/{i}.wav", "caption": i})
                                                   for i in ("a", "b")])  # fmt: skip
    triples = tmp_path / "hard.jsonl"
    triples.write_bytes((BOM + json.dumps({"query": "a dog", "target": "a", "negative": "b"}) + "\n").encode("utf-8"))
    assert read_hard_negatives(str(triples), read_manifest(manifest)) == [HardNegative("a dog", 0, 1)]
