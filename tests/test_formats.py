"""Annotation files as users hold them (datamodules/formats.py): Clotho and AudioCaps CSVs, WavCaps JSON,
Hugging Face parquet / save_to_disk tables and the NLI CSV, read directly; their bad rows; ``convert``
to JSONL; ``check-data`` on them; and one epoch of the tiny model on each, through the real CLI.

The audio comes from the project's synthetic generator. Every expected record is built here, from the
generated clips and the rows this file writes, never from the readers under test."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil

import pytest
import soundfile as sf
import torch
import yaml

from datamodules.formats import ManifestSpec
from datamodules.manifest import ManifestError, read_jsonl, read_manifest
from datamodules.synthetic import make_synthetic_dataset

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_CLIPS = 8


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Eight generated clips: ``{"id", "wav", "captions" (5), "bytes"}``, read from the generator's
    own JSONL with :mod:`json`."""
    root = tmp_path_factory.mktemp("generated")
    paths = make_synthetic_dataset(str(root), num_train=N_CLIPS, num_val=0, num_test=0, num_hard_pairs=0)
    folder = os.path.dirname(paths["train"])
    with open(paths["train"], encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    out = []
    for row in rows:
        wav = os.path.join(folder, row["audio"])
        with open(wav, "rb") as handle:
            out.append({"id": row["id"], "wav": wav, "captions": row["caption"], "bytes": handle.read()})
    assert len(out) == N_CLIPS and all(len(c["captions"]) == 5 for c in out)
    return out


def summary(records):
    return [(r.id, r.audio_path, r.captions) for r in records]


def copy(src, dst) -> str:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(src, dst)
    return str(dst)


def write_flac(src, dst) -> str:
    data, rate = sf.read(src, dtype="float32")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    sf.write(dst, data, rate, format="FLAC")
    return str(dst)


def write_csv(path, header, rows) -> str:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


# --- writers of each format, and the records each must give ----------------------------------------


def clotho(clips, folder):
    """Clotho v2: ``file_name, caption_1 … caption_5``, audio in ``development/``; the first clip's
    second caption holds a comma, quotes and a line break (a quoted cell over two lines)."""
    audio_dir = folder / "development"
    rows, expected = [], []
    for i, clip in enumerate(clips):
        name = f"{clip['id']} field take.wav"
        path = copy(clip["wav"], audio_dir / name)
        captions = list(clip["captions"])
        if i == 0:
            captions[1] = 'a hum, then "beeps"\nover noise'
        rows.append([name, *captions])
        expected.append((name, path, captions))
    csv_path = write_csv(folder / "clotho_captions_development.csv",
                         ["file_name"] + [f"caption_{k}" for k in range(1, 6)], rows)  # fmt: skip
    return ManifestSpec(csv_path, audio_dir=str(audio_dir)), expected


def audiocaps_rows(clips):
    """AudioCaps: one caption per row, five rounds over the clips, the first round in reverse order;
    clips 0 and 1 are two segments of one video."""
    rows = []
    for k in range(5):
        order = range(len(clips) - 1, -1, -1) if k == 0 else range(len(clips))
        for i in order:
            youtube_id = "vid-0_a" if i < 2 else f"vid-{i}_b"
            rows.append([str(1000 * i + k), youtube_id, str(10 * i), clips[i]["captions"][k]])
    return rows


def audiocaps(clips, folder):
    audio_dir = folder / "audio"
    expected = []
    for i in range(len(clips) - 1, -1, -1):  # clips appear in the order of the first round
        youtube_id = "vid-0_a" if i < 2 else f"vid-{i}_b"
        name = f"{youtube_id}_{10 * i}"
        path = copy(clips[i]["wav"], audio_dir / f"{name}.wav")  # the CSV names no extension
        expected.append((name, path, list(clips[i]["captions"])))
    path = write_csv(folder / "val.csv", ["audiocap_id", "youtube_id", "start_time", "caption"], audiocaps_rows(clips))
    return ManifestSpec(path, audio_dir=str(audio_dir), file_template="{youtube_id}_{start_time}"), expected


def wavcaps(clips, folder):
    """WavCaps as released: FreeSound-style entries (numeric ids, audio ``<id>.flac``) and
    AudioSet_SL-style ones (ids ending in ``.wav``, ``audio`` a placeholder, audio ``<stem>.flac``)."""
    audio_dir = folder / "flac"
    data, expected = [], []
    for i, clip in enumerate(clips):
        if i < len(clips) // 2:
            clip_id = str(180913 + i)
            entry = {"id": clip_id, "file_name": f"field recording {i}.wav", "href": f"sounds/{clip_id}",
                     "tags": ["field", "hum"], "description": f"raw description {i}", "author": "someone",
                     "download_link": f"https://example.org/{clip_id}", "caption": clip["captions"][0],
                     "duration": 2.5}  # fmt: skip
            path = write_flac(clip["wav"], audio_dir / f"{clip_id}.flac")
        else:
            clip_id = f"Yas{i}_30.000.wav"
            entry = {"id": clip_id, "caption": clip["captions"][0], "audio": "wav_path", "duration": 10.0}
            path = write_flac(clip["wav"], audio_dir / f"Yas{i}_30.000.flac")
        data.append(entry)
        expected.append((clip_id, path, [clip["captions"][0]]))
    json_path = folder / "fsd_final.json"
    json_path.write_text(json.dumps({"num_captions_per_audio": 1, "data": data}), encoding="utf-8")
    return ManifestSpec(str(json_path), audio_dir=str(audio_dir)), expected


AUDIO_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def hf_save_to_disk(clips, folder):
    """A ``save_to_disk`` folder: two arrow-stream shards named in ``state.json``; audio as bytes
    except the last clip's, a path relative to the dataset folder; no id column (ids: the paths)."""
    dataset = folder / "hf_train"
    copy(clips[-1]["wav"], dataset / "files" / "last.wav")
    audio = [{"bytes": c["bytes"], "path": f"{c['id']}.wav"} for c in clips[:-1]]
    audio.append({"bytes": None, "path": "files/last.wav"})
    table = pa.table({"audio": pa.array(audio, type=AUDIO_STRUCT),
                      "caption": [c["captions"][2] for c in clips],
                      "duration": [1.5] * len(clips)})  # fmt: skip
    shards = [table.slice(0, 5), table.slice(5)]
    names = [f"data-{i:05d}-of-00002.arrow" for i in range(2)]
    for name, shard in zip(names, shards):
        with pa.OSFile(str(dataset / name), "wb") as sink, pa.ipc.new_stream(sink, shard.schema) as writer:
            writer.write_table(shard)
    (dataset / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                    "_split": "train"}), encoding="utf-8")  # fmt: skip
    (dataset / "dataset_info.json").write_text(json.dumps({"features": {}}), encoding="utf-8")
    cache = folder / "audio_cache"
    expected = []
    for clip in clips[:-1]:
        digest = hashlib.sha256(clip["bytes"]).hexdigest()
        expected.append((f"{clip['id']}.wav", str(cache / digest[:2] / f"{digest}.wav"), [clip["captions"][2]]))
    expected.append(("files/last.wav", str(dataset / "files" / "last.wav"), [clips[-1]["captions"][2]]))
    return ManifestSpec(str(dataset), audio_cache_dir=str(cache)), expected


def nli(folder):
    rows = [(f"query {i}", f"document {i}", f"negative {i}" if i % 2 else "") for i in range(N_CLIPS)]
    path = write_csv(folder / "nli_for_simcse.csv", ["sent0", "sent1", "hard_neg"], rows)
    expected = [(f"{path}:{i + 2}", "", [f"document {i}"]) for i in range(N_CLIPS)]
    return ManifestSpec(path), expected


@pytest.fixture(scope="module")
def written(clips, tmp_path_factory):
    """``{format: (spec, expected records)}``: one tiny file of every format."""
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for name, write in (("clotho", clotho), ("audiocaps", audiocaps), ("wavcaps", wavcaps), ("hf", hf_save_to_disk)):
        folder = root / name
        folder.mkdir()
        out[name] = write(clips, folder)
    (root / "nli").mkdir()
    out["nli"] = nli(root / "nli")
    return out


# --- reading -----------------------------------------------------------------------------------------


def test_clotho_csv(written):
    spec, expected = written["clotho"]
    records = read_manifest(spec)
    assert summary(records) == expected
    # the first row spans lines 2-3 (its quoted caption has a line break), so the second starts on 4
    assert [r.source for r in records[:3]] == [f"{spec.path}:2", f"{spec.path}:4", f"{spec.path}:5"]
    # a plain path is detected by its header; the data module's audio_dir fills the spec
    assert summary(read_manifest(spec.path, audio_dir=spec.audio_dir)) == expected


def test_audiocaps_csv_groups_rows_into_clips(written):
    spec, expected = written["audiocaps"]
    records = read_manifest(spec)
    assert summary(records) == expected
    n = N_CLIPS
    # clip i's first row is in the first (reversed) round: line 2 + (n - 1 - i)
    assert [r.source for r in records] == [f"{spec.path}:{2 + (n - 1 - i)}" for i in range(n - 1, -1, -1)]
    last = records[0]  # clip n - 1
    assert last.extra == {"youtube_id": f"vid-{n - 1}_b", "start_time": str(10 * (n - 1)),
                          "audiocap_id": [str(1000 * (n - 1) + k) for k in range(5)]}  # fmt: skip
    assert summary(read_manifest(spec.path, audio_dir=spec.audio_dir)) == expected  # the default template


def test_audiocaps_template_with_prefix_and_no_extension(clips, tmp_path):
    """``Y{youtube_id}`` names FLAC files; two segments of one video then share an id: the first kept."""
    rows = audiocaps_rows(clips)
    path = write_csv(tmp_path / "train.csv", ["audiocap_id", "youtube_id", "start_time", "caption"], rows)
    ids = ["vid-0_a"] + [f"vid-{i}_b" for i in range(2, N_CLIPS)]
    for i, youtube_id in zip([0, *range(2, N_CLIPS)], ids):
        write_flac(clips[i]["wav"], tmp_path / "audio" / f"Y{youtube_id}.flac")
    spec = ManifestSpec(path, audio_dir=str(tmp_path / "audio"), file_template="Y{youtube_id}")
    with pytest.raises(ManifestError, match=rf"{path}:\d+: duplicate clip id 'Yvid-0_a'"):
        read_manifest(spec)
    problems = []
    records = read_manifest(spec, problems=problems)
    # first appearance: clips n-1 … 2, then 1 (video vid-0_a, kept), then 0 (same id, dropped)
    assert [r.id for r in records] == [f"Yvid-{i}_b" for i in range(N_CLIPS - 1, 1, -1)] + ["Yvid-0_a"]
    assert records[-1].captions == list(clips[1]["captions"])
    assert records[-1].audio_path == str(tmp_path / "audio" / "Yvid-0_a.flac")
    assert [(p.reason, p.source) for p in problems] == [("duplicate_id", f"{path}:{2 + N_CLIPS - 1}")]


def test_wavcaps_json(written):
    spec, expected = written["wavcaps"]
    records = read_manifest(spec)
    assert summary(records) == expected
    assert records[0].extra == {"file_name": "field recording 0.wav", "href": "sounds/180913", "tags": ["field", "hum"],
                                "description": "raw description 0", "author": "someone",
                                "download_link": "https://example.org/180913", "duration": 2.5}  # fmt: skip
    assert records[-1].extra == {"duration": 10.0} and records[-1].source == f"{spec.path}:entry {N_CLIPS - 1}"
    assert records[0].texts("description") == ["raw description 0"]  # a caption field to train on


def test_wavcaps_multi_caption_entries_without_ids(clips, tmp_path):
    """WavCaps' own Clotho files: ``caption_1`` … ``caption_5``, ``wav`` relative to the data root and
    ``audio`` an absolute path on another machine; the clip id is the file under audio_dir."""
    data, expected = [], []
    for i, clip in enumerate(clips[:3]):
        rel = f"Clotho/waveforms/dev/clip {i}.wav"
        path = copy(clip["wav"], tmp_path / "root" / rel)
        entry = {f"caption_{k + 1}": c for k, c in enumerate(clip["captions"])}
        data.append({**entry, "wav": rel, "audio": f"/home/elsewhere/data/{rel}"})
        expected.append((rel, path, list(clip["captions"])))
    json_path = tmp_path / "train.json"
    json_path.write_text(json.dumps({"data": data, "num_captions_per_audio": 5}), encoding="utf-8")
    assert summary(read_manifest(str(json_path), audio_dir=str(tmp_path / "root"))) == expected


def test_json_lists_stay_json_lists(clips, tmp_path):
    """A ``{"data": [...]}`` file without WavCaps' keys is the JSON list format, as before."""
    copy(clips[0]["wav"], tmp_path / "a.wav")
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"data": [{"id": "a", "caption": ["x", "y"]}]}), encoding="utf-8")
    assert summary(read_manifest(str(path))) == [("a", str(tmp_path / "a.wav"), ["x", "y"])]


def test_hf_save_to_disk_folder(written):
    spec, expected = written["hf"]
    records = read_manifest(spec)
    assert summary(records) == expected
    shard = os.path.join(spec.path, "data-00001-of-00002.arrow")
    assert records[5].source == f"{shard}:row 0" and records[5].extra == {"duration": 1.5}
    # the cached files hold the bytes, and a second read writes nothing
    for record, clip in zip(records[:-1], written_clips(written)):
        with open(record.audio_path, "rb") as handle:
            assert handle.read() == clip
    stamps = [os.stat(r.audio_path).st_mtime_ns for r in records[:-1]]
    assert summary(read_manifest(spec)) == expected
    assert [os.stat(r.audio_path).st_mtime_ns for r in records[:-1]] == stamps


def written_clips(written):
    """The audio bytes of the hf fixture's byte rows, read back from its arrow shards with pyarrow."""
    spec, _ = written["hf"]
    out = []
    for name in ("data-00000-of-00002.arrow", "data-00001-of-00002.arrow"):
        with pa.memory_map(os.path.join(spec.path, name)) as source:
            out += [a["bytes"] for a in pa.ipc.open_stream(source).read_all().column("audio").to_pylist()]
    return [b for b in out if b is not None]


def test_hf_parquet_with_caption_lists_and_ids(clips, tmp_path):
    """A parquet file: ``captions`` lists, an ``id`` column, audio as bytes or paths; the cache names
    files by content, so equal bytes share one file and different bytes never do."""
    audio = [{"bytes": c["bytes"], "path": None} for c in clips[:3]] + [{"bytes": clips[0]["bytes"], "path": "x.flac"}]
    table = pa.table({"id": ["a", "b", "c", "d"], "audio": pa.array(audio, type=AUDIO_STRUCT),
                      "captions": [list(c["captions"][:2]) for c in clips[:3]] + [["same audio"]],
                      "label": [3, 1, 4, 1]})  # fmt: skip
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(table, path)
    records = read_manifest(ManifestSpec(str(path), audio_cache_dir=str(tmp_path / "cache")))
    digests = [hashlib.sha256(c["bytes"]).hexdigest() for c in clips[:3]] + [hashlib.sha256(clips[0]["bytes"]).hexdigest()]
    assert summary(records) == [
        (i, str(tmp_path / "cache" / d[:2] / f"{d}.wav"), caps)  # RIFF bytes are cached as .wav
        for i, d, caps in zip("abcd", digests, [list(c["captions"][:2]) for c in clips[:3]] + [["same audio"]])
    ]
    assert all("label" not in r.extra for r in records)  # a ClassLabel index is no text label
    assert len(os.listdir(tmp_path / "cache" / digests[0][:2])) == 1


# --- bad input -------------------------------------------------------------------------------------


def read_both(spec):
    """What ``error`` raises and what ``skip`` keeps and counts."""
    with pytest.raises(ManifestError) as info:
        read_manifest(spec)
    problems = []
    records = read_manifest(spec, problems=problems)
    return str(info.value), records, [(p.reason, p.source) for p in problems]


def test_bad_clotho_rows(clips, tmp_path):
    for name in ("a.wav", "c.wav"):
        copy(clips[0]["wav"], tmp_path / "audio" / name)
    path = tmp_path / "clotho.csv"
    path.write_text(
        "file_name,caption_1,caption_2\n"
        "a.wav,one,two\n"
        "missing.wav,one,two\n"  # line 3
        "c.wav,one,\n"  # line 4: empty caption
        "c.wav,one, two, three\n"  # line 5: an unquoted comma
        "a.wav,again,again\n",  # line 6: duplicate
        encoding="utf-8",
    )
    message, records, problems = read_both(ManifestSpec(str(path), audio_dir=str(tmp_path / "audio")))
    assert message.startswith(f"{path}:3: audio file not found") and "missing.wav" in message
    assert summary(records) == [("a.wav", str(tmp_path / "audio" / "a.wav"), ["one", "two"])]
    assert problems == [("missing_file", f"{path}:3"), ("empty_text", f"{path}:4"), ("wrong_type", f"{path}:5"),
                        ("duplicate_id", f"{path}:6")]  # fmt: skip


def test_bad_audiocaps_rows(clips, tmp_path):
    copy(clips[0]["wav"], tmp_path / "v1_0.wav")
    path = tmp_path / "train.csv"
    path.write_text(
        "audiocap_id,youtube_id,start_time,caption\n"
        "1,v1,0,a hum\n"
        "2,v2,30,no audio for this clip\n"  # line 3: v2_30 missing
        "3,v1,0,   \n"  # line 4: blank caption; the clip keeps its other captions
        "4,,0,no video id\n"  # line 5
        "5,v1,0,a second caption\n",
        encoding="utf-8",
    )
    message, records, problems = read_both(str(path))
    assert message.startswith(f"{path}:4: empty 'caption'")  # rows are read before clips are built
    assert summary(records) == [("v1_0", str(tmp_path / "v1_0.wav"), ["a hum", "a second caption"])]
    assert problems == [("empty_text", f"{path}:4"), ("missing_field", f"{path}:5"), ("missing_file", f"{path}:3")]


def test_whole_file_problems_raise_under_skip_too(tmp_path):
    unknown = write_csv(tmp_path / "other.csv", ["path", "text"], [["a.wav", "x"]])
    with pytest.raises(ManifestError) as info:
        read_manifest(unknown, problems=[])
    assert str(info.value).startswith(f"{unknown}: unknown CSV layout (columns ['path', 'text']); known layouts: ")
    for layout in ("file_name, caption_1", "audiocap_id, youtube_id, start_time, caption", "sent0, sent1"):
        assert layout in str(info.value)
    caps = write_csv(tmp_path / "caps.csv", ["audiocap_id", "youtube_id", "start_time", "caption"], [["1", "v", "0", "x"]])
    with pytest.raises(ManifestError, match=rf"{caps}:1: file_template '\{{ytid\}}.wav' names 'ytid', which the "
                                            r"header lacks \(columns \['audiocap_id'"):  # fmt: skip
        read_manifest(ManifestSpec(caps, file_template="{ytid}.wav"), problems=[])
    with pytest.raises(ManifestError, match=rf"{caps}: unknown CSV layout .*known layouts: file_name"):
        read_manifest(ManifestSpec(caps, format="clotho"))
    with pytest.raises(ManifestError, match=r"file_template applies to the audiocaps and wavcaps formats; this "
                                            r"manifest is read as nli"):  # fmt: skip
        read_manifest(ManifestSpec(write_csv(tmp_path / "nli.csv", ["sent0", "sent1"], [["q", "d"]]),
                                   file_template="{sent0}"))  # fmt: skip
    with pytest.raises(ValueError, match="fields name columns"):
        ManifestSpec(caps, file_template="{}.wav")
    with pytest.raises(ManifestError, match=r"x.tsv: unknown manifest format"):
        read_manifest(write_csv(tmp_path / "x.tsv", ["a"], []))


def test_bad_wavcaps_entries(clips, tmp_path):
    write_flac(clips[0]["wav"], tmp_path / "1.flac")
    path = tmp_path / "sb_final.json"
    path.write_text(json.dumps({"num_captions_per_audio": 1, "data": [
        {"id": "1", "caption": "fine", "duration": 1.0},
        "not an entry",
        {"id": "1", "duration": 1.0},
        {"id": "2", "caption": "no audio", "duration": 1.0},
        {"id": "1", "caption": "again", "duration": 1.0},
    ]}), encoding="utf-8")  # fmt: skip
    message, records, problems = read_both(str(path))
    assert message == f"{path}:entry 1: an entry must be a JSON object, got str"
    assert summary(records) == [("1", str(tmp_path / "1.flac"), ["fine"])]
    assert problems == [("not_an_object", f"{path}:entry 1"), ("missing_field", f"{path}:entry 2"),
                        ("missing_file", f"{path}:entry 3"), ("duplicate_id", f"{path}:entry 4")]  # fmt: skip


def test_bad_hf_rows(clips, tmp_path):
    copy(clips[0]["wav"], tmp_path / "on_disk.wav")
    audio = [{"bytes": None, "path": "on_disk.wav"}, None, {"bytes": clips[1]["bytes"], "path": None},
             {"bytes": None, "path": "gone.wav"}, {"bytes": None, "path": "on_disk.wav"}]  # fmt: skip
    table = pa.table({"audio": pa.array(audio, type=AUDIO_STRUCT), "text": ["ok", "no audio", None, "gone", "dup"]})
    path = tmp_path / "test.parquet"
    pq.write_table(table, path)
    spec = ManifestSpec(str(path), audio_cache_dir=str(tmp_path / "cache"))
    message, records, problems = read_both(spec)
    assert message == f"{path}:row 1: 'audio' holds neither bytes nor a path"
    assert summary(records) == [("on_disk.wav", str(tmp_path / "on_disk.wav"), ["ok"])]
    assert problems == [("missing_field", f"{path}:row 1"), ("missing_field", f"{path}:row 2"),
                        ("missing_file", f"{path}:row 3"), ("duplicate_id", f"{path}:row 4")]  # fmt: skip
    other = tmp_path / "described.parquet"
    pq.write_table(table.rename_columns(["audio", "description"]), other)
    with pytest.raises(ManifestError, match=rf"{other}: no caption column \(tried caption, captions, text; columns "
                                            r"\['audio', 'description'\]\); set caption_columns"):  # fmt: skip
        read_manifest(str(other), problems=[])
    named = ManifestSpec(str(other), caption_columns=["description"], audio_cache_dir=str(tmp_path / "cache"))
    assert [r.captions for r in read_manifest(named, problems=[])] == [["ok"]]


# --- convert -----------------------------------------------------------------------------------------


FORMATS = ("clotho", "audiocaps", "wavcaps", "hf", "nli")


def spec_argument(spec: ManifestSpec) -> list[str]:
    """``convert``'s arguments for a spec: the path, and each option that is set as a flag."""
    args = ["--manifest", spec.path]
    for name in ("format", "audio_dir", "file_template", "audio_cache_dir"):
        value = getattr(spec, name)
        if value is not None and value != "auto":
            args += [f"--{name}", value]
    return args


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_writes_jsonl_that_reads_back_to_the_same_records(fmt, written, tmp_path):
    from main import main

    spec, _ = written[fmt]
    output = tmp_path / "out" / f"{fmt}.jsonl"
    with pytest.raises(SystemExit) as done:
        main(["convert", *spec_argument(spec), "--output", str(output)])
    assert done.value.code == 0
    original, converted = read_manifest(spec), read_jsonl(str(output))
    assert [(r.id, r.audio_path, r.captions, r.extra) for r in converted] == [
        (r.id, os.path.abspath(r.audio_path) if r.audio_path else "", r.captions, r.extra) for r in original
    ]


def test_convert_takes_a_spec_mapping_skips_bad_rows_and_never_overwrites_its_input(written, tmp_path, capsys):
    from datamodules.convert import main as convert

    spec, expected = written["audiocaps"]
    mapping = json.dumps({"path": spec.path, "audio_dir": spec.audio_dir, "file_template": "{youtube_id}_{start_time}"})
    assert convert(["--manifest", mapping, "--output", str(tmp_path / "a.jsonl")]) == 0
    assert summary(read_jsonl(str(tmp_path / "a.jsonl"))) == expected
    assert convert(["--manifest", spec.path, "--output", spec.path]) == 1
    assert "is the input manifest" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("audiocap_id,youtube_id,start_time,caption\n1,v,0,x\n", encoding="utf-8")
    assert convert(["--manifest", str(bad), "--output", str(tmp_path / "b.jsonl")]) == 1
    assert f"{bad}:2: audio file not found" in capsys.readouterr().err and not (tmp_path / "b.jsonl").exists()
    assert convert(["--manifest", str(bad), "--output", str(tmp_path / "b.jsonl"), "--on_bad_sample", "skip"]) == 0
    out = capsys.readouterr()
    assert "wrote 0 clips" in out.out and "1 missing_file" in out.out and f"{bad}:2  missing_file" in out.err


# --- check-data and training through the real CLI -------------------------------------------------


def tiny_config(tmp_path, data: dict) -> str:
    """The demo's tiny random thinker, one epoch, no validation, on ``data``'s RetrievalDataModule."""
    with open(os.path.join(REPO, "configs", "demo.yaml"), encoding="utf-8") as handle:
        demo = yaml.safe_load(handle)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "log_every_n_steps": 1,
                    "default_root_dir": str(tmp_path / "run"), "enable_progress_bar": False,
                    "enable_model_summary": False},
        "checkpoint": {"monitor": None},
        "model": demo["model"],
        "data": {"class_path": "RetrievalDataModule",
                 "init_args": {"batch_size": 4, "num_workers": 0, "train_max_seconds": 1.0, **data}},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def spec_mapping(spec: ManifestSpec) -> dict:
    return {k: v for k, v in vars(spec).items() if v is not None and v != "auto"}


#: how each format reaches the data module: a spec mapping in the YAML, or a plain path on the
#: command line (an existing file given where the type is ``str | ManifestSpec``).
AS_MAPPING = {"audiocaps", "hf"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_epoch_of_the_tiny_model_on_each_format(fmt, written, tmp_path):
    from lightning_modules import EmbeddingModule
    from main import EmbeddingCLI
    from datamodules import RetrievalDataModule

    spec, expected = written[fmt]
    if fmt in AS_MAPPING:
        config, flags = tiny_config(tmp_path, {"train_manifest": spec_mapping(spec)}), []
    else:
        config = tiny_config(tmp_path, {})
        flags = ["--data.init_args.train_manifest", spec.path]
        if spec.audio_dir is not None:
            flags += ["--data.init_args.audio_dir", spec.audio_dir]
    cli = EmbeddingCLI(EmbeddingModule, RetrievalDataModule, subclass_mode_data=True, run=False,
                       args=["--config", config, *flags])  # fmt: skip
    given = cli.datamodule.manifests["train"]
    if fmt in AS_MAPPING:
        assert isinstance(given, ManifestSpec) and given == spec
    else:
        assert given == spec.path and type(given) is str
    before = {n: p.detach().clone() for n, p in cli.model.named_parameters() if p.requires_grad}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert summary(cli.datamodule.records["train"]) == expected
    assert cli.trainer.global_step == N_CLIPS // 4
    loss = cli.trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)
    after = dict(cli.model.named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} trainable tensors changed"


def test_check_data_reads_every_format_and_names_bad_rows(written, tmp_path, capsys):
    from datamodules.check import main as check_data

    sets = {fmt: {"manifest": spec_mapping(written[fmt][0])} for fmt in ("clotho", "wavcaps", "hf")}
    config = tiny_config(tmp_path, {"train_manifest": spec_mapping(written["audiocaps"][0]), "val_sets": sets})
    assert check_data(["--config", config]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    for fmt in ("audiocaps", "clotho", "wavcaps", "hf"):
        assert written[fmt][0].path in out
    assert out.count(f" {N_CLIPS:>8} {N_CLIPS:>8}  none") == 4 and "result: no problems" in out

    spec, _ = written["audiocaps"]
    broken = tmp_path / "broken.csv"
    lines = open(spec.path, encoding="utf-8").read().splitlines()
    broken.write_text("\n".join(lines + ["9,vid-404,0,no such clip"]) + "\n", encoding="utf-8")
    mapping = {**spec_mapping(spec), "path": str(broken)}
    assert check_data(["--config", config, "--data.init_args.train_manifest", json.dumps(mapping),
                       "--data.init_args.val_sets", "null"]) == 1  # fmt: skip
    out = capsys.readouterr().out
    assert f"{broken}:{len(lines) + 1}  missing_file" in out


def test_without_pyarrow_the_error_names_the_extra(written, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # what an environment without pyarrow imports
    with pytest.raises(ImportError, match=r"needs pyarrow: pip install 'alm-embed\[hf\]'"):
        read_manifest(written["hf"][0])
    assert summary(read_manifest(written["clotho"][0])) == written["clotho"][1]  # the other formats need none
