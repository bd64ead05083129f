"""``check-data --decode``: every clip decoded in full finds what the header scan passes (a
truncated FLAC, NaN samples); ``--write_clean`` writes the rows that passed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from datamodules.check import main as check_data
from datamodules.manifest import read_jsonl

RATE = 16000
REPO = Path(__file__).resolve().parent.parent


def tone(seconds=1.0):
    return (0.5 * np.sin(2 * np.pi * 440 * np.arange(int(RATE * seconds)) / RATE)).astype(np.float32)


def truncated(path, fmt):
    sf.write(path, tone(), RATE, subtype="PCM_16", format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def corpus(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(3):
        sf.write(audio / f"good{i}.wav", tone(0.5 + 0.1 * i), RATE)
    truncated(audio / "cut.flac", "FLAC")
    nan = tone()
    nan[500] = np.nan
    sf.write(audio / "nan.wav", nan, RATE, subtype="FLOAT")
    names = ["good0.wav", "cut.flac", "good1.wav", "nan.wav", "good2.wav"]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps({"audio": f"audio/{n}", "caption": f"clip {n}", "tags": "a, b"}) + "\n"
                                for n in names), encoding="utf-8")
    config = tmp_path / "data.yaml"
    config.write_text(f"data:\n  class_path: RetrievalDataModule\n  init_args:\n    train_manifest: {manifest}\n",
                      encoding="utf-8")
    return tmp_path, manifest, config


def test_header_scan_passes_what_decoding_finds(corpus, capsys):
    _, manifest, config = corpus
    assert check_data(["--config", str(config)]) == 0  # the headers of all five are fine
    capsys.readouterr()
    assert check_data(["--config", str(config), "--decode", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    problems = [line.split()[:3] for line in out.splitlines() if line.startswith(f"  {manifest}:")]
    audio = manifest.parent / "audio"
    assert problems == [
        [f"{manifest}:2", "decode_error", str(audio / "cut.flac")],
        [f"{manifest}:4", "non_finite", str(audio / "nan.wav")],
    ]
    assert "result: 2 problems" in out


def test_workers_give_the_same_report(corpus, capsys):
    _, _, config = corpus
    check_data(["--config", str(config), "--decode", "--workers", "1"])
    one = capsys.readouterr().out
    check_data(["--config", str(config), "--decode", "--workers", "2"])
    assert capsys.readouterr().out == one


def test_write_clean_keeps_the_rows_that_passed(corpus, capsys):
    root, manifest, config = corpus
    before = manifest.read_bytes()
    out = root / "clean.jsonl"
    check_data(["--config", str(config), "--decode", "--workers", "2", "--write_clean", str(out)])
    assert manifest.read_bytes() == before
    clean = read_jsonl(str(out))
    assert [Path(r.audio_path).name for r in clean] == ["good0.wav", "good1.wav", "good2.wav"]
    assert [r.captions for r in clean] == [["clip good0.wav"], ["clip good1.wav"], ["clip good2.wav"]]
    assert all(r.tags == ["a", "b"] and os.path.isabs(r.audio_path) for r in clean)
    assert check_data(["--config", str(config), "--decode", "--data.init_args.train_manifest", str(out)]) == 0


def test_decode_runs_from_the_command_line(corpus):
    _, _, config = corpus
    done = subprocess.run([sys.executable, str(REPO / "main.py"), "check-data", "--config", str(config), "--decode",
                           "--workers", "2"], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 1, done.stderr[-2000:]
    assert "decode_error" in done.stdout and "non_finite" in done.stdout
