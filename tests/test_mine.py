"""``main.py mine`` on a 2-step demo model, against a float64 brute force of the same embeddings, and
the reader of its output (``datamodules.hard_negatives.read_mined``)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors import safe_open

from datamodules import SyntheticDataModule
from datamodules.hard_negatives import MinedNegatives, read_mined
from datamodules.manifest import ManifestError
from lightning_modules.tools.mine import PredictOutput, mine_negatives
from main import main

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "configs" / "demo.yaml")
SIZES = {"num_train": 16, "num_val": 4, "num_test": 2, "num_hard_pairs": 0}
K = 4


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step demo fit (with a linear head, so an export has head weights to carry), a manifest of
    its training clips plus two duplicates, and ``mine`` over that manifest with the checkpoint."""
    root = tmp_path_factory.mktemp("mine")
    sizes = [arg for key, value in SIZES.items() for arg in (f"--data.init_args.{key}", str(value))]
    fit = main(["fit", "--config", DEMO, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar",
                "false", "--data.init_args.root", str(root / "data"), *sizes, "--data.init_args.batch_size", "8",
                "--trainer.max_steps", "2", "--test_after_fit", "false", "--model.head", "LinearHead",
                "--model.head.init_args.out_features", "24"])
    ckpt = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"

    manifests = fit.datamodule.manifests
    rows = read_lines(manifests["train"])
    for row in rows:
        row["audio"] = str(Path(manifests["train"]).parent / row["audio"])
    test_clip = read_lines(manifests["predict"])[0]
    rows += [
        # the audio of the first clip under another id and caption: a duplicate by audio file
        {"id": "same_audio", "audio": rows[0]["audio"], "caption": ["an entirely different description"]},
        # a test clip's audio with a caption of the second clip, re-cased and ended with a period
        {"id": "same_caption", "audio": str(Path(manifests["predict"]).parent / test_clip["audio"]),
         "caption": [rows[1]["caption"][0].upper() + ".", "one more caption"]},
    ]
    manifest = root / "dups.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = root / "mine.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        "data": {"class_path": "RetrievalDataModule",
                 "init_args": {"train_manifest": str(manifest), "eval_batch_size": 5, "num_workers": 0}},
    }))
    output = root / "ckpt" / "mined.jsonl"
    args = ["mine", "--config", str(config), "--k", str(K), "--threshold", "none", "--no_progress"]
    summary = main([*args, "--ckpt_path", str(ckpt), "--output", str(output)])
    return SimpleNamespace(root=root, ckpt=ckpt, rows=rows, config=config, args=args, output=output,
                           summary=summary, embeddings=Path(summary["embeddings"]), fit=fit)


def brute_force(embeddings_path, rows, threshold):
    """Every clip's negatives in float64 from the embeddings file, by the rule the docs state, best
    first and not cut at k: ``{"id", "audio": [(clip, score)], "text": [(caption id, clip, text, score)]}``."""
    with safe_open(str(embeddings_path), framework="pt") as handle:
        audio, text = (handle.get_tensor(key) for key in ("audio", "text"))
    ids = json.loads(embeddings_path.with_suffix(".json").read_text())
    return brute_force_tensors(audio, text, ids["audio"]["ids"], ids["text"]["ids"], ids["text"]["texts"], rows,
                               threshold)


def brute_force_tensors(audio, text, clip_ids, text_ids, texts, rows, threshold):
    audio, text = audio.double(), text.double()
    audio = audio / audio.norm(dim=1, keepdim=True)
    text = text / text.norm(dim=1, keepdim=True)
    assert clip_ids == [row["id"] for row in rows]
    owner = [clip_ids.index(text_id.rsplit("#", 1)[0]) for text_id in text_ids]

    def key(caption):
        return " ".join(caption.lower().split()).strip(" .")

    captions = [{key(c) for c in row["caption"]} for row in rows]
    files = [os.path.realpath(row["audio"]) for row in rows]
    expected = []
    for i in range(len(rows)):
        duplicate = [j == i or files[j] == files[i] or bool(captions[j] & captions[i]) for j in range(len(rows))]

        def ranked(scores, allowed):
            order = sorted((j for j in range(len(scores)) if allowed(j)), key=lambda j: -scores[j])
            return [(j, float(scores[j])) for j in order if threshold is None or scores[j] >= threshold]

        expected.append({
            "id": clip_ids[i],
            "audio": [(clip_ids[j], s) for j, s in ranked(audio @ audio[i], lambda j: not duplicate[j])],
            "text": [(text_ids[r], clip_ids[owner[r]], texts[r], s)
                     for r, s in ranked(text @ audio[i], lambda r: not duplicate[owner[r]])],
        })
    return expected, (audio, clip_ids)


def assert_same_negatives(found, expected, k):
    """The first ``k`` of the brute force, in order, with scores to 1e-6. Neighbours whose float64
    scores are within 1e-6 of each other may come in either order (float32 rounding decides)."""
    assert [line["id"] for line in found] == [line["id"] for line in expected]
    for got, want in zip(found, expected):
        for side in ("audio", "text"):
            top = want[side][:k]
            assert len(got[side]) == len(top), (got["id"], side)
            entry_of = {entry[0]: entry for entry in want[side]}
            for position, (entry, wanted) in enumerate(zip(got[side], top)):
                assert entry["score"] == pytest.approx(wanted[-1], abs=1e-6), (got["id"], side, position)
                if entry["id"] != wanted[0]:
                    assert abs(entry_of[entry["id"]][-1] - wanted[-1]) < 1e-6, (got["id"], side, position)
                if side == "text":
                    assert (entry["clip"], entry["text"]) == entry_of[entry["id"]][1:3]
            assert len({entry["id"] for entry in got[side]}) == len(got[side])


def test_mined_file_matches_a_float64_brute_force(run, capsys):
    found = read_lines(run.output)
    expected, (audio, clip_ids) = brute_force(run.embeddings, run.rows, None)
    assert_same_negatives(found, expected, K)
    assert all(len(line["audio"]) == len(line["text"]) == K for line in found)

    # The exclusions mattered: without them the duplicates would top each other's lists.
    first, copy = clip_ids.index(run.rows[0]["id"]), clip_ids.index("same_audio")
    others = [j for j in range(len(clip_ids)) if j != first]
    assert max(others, key=lambda j: float(audio[first] @ audio[j])) == copy
    by_id = {line["id"]: line for line in found}
    for a, b in ((run.rows[0]["id"], "same_audio"), (run.rows[1]["id"], "same_caption")):
        assert b not in [n["id"] for n in by_id[a]["audio"]] + [n["clip"] for n in by_id[a]["text"]]
        assert a not in [n["id"] for n in by_id[b]["audio"]] + [n["clip"] for n in by_id[b]["text"]]

    assert run.summary["clips"] == len(run.rows)
    assert run.summary["audio_mean"] == run.summary["text_mean"] == K
    assert run.summary["audio_none"] == run.summary["text_none"] == 0


def test_threshold_and_small_chunks_on_an_existing_embeddings_file(run, tmp_path, capsys):
    # A threshold in the widest gap between the middle half of the top-k scores: it cuts some lists
    # short, and no score lies near it, so float32 and float64 agree on which pass.
    expected_all, _ = brute_force(run.embeddings, run.rows, None)
    scores = sorted(n[-1] for line in expected_all for side in ("audio", "text") for n in line[side][:K])
    middle = scores[len(scores) // 4 : 3 * len(scores) // 4]
    gap, threshold = max((b - a, (a + b) / 2) for a, b in zip(middle, middle[1:]))
    assert gap > 1e-5
    output = tmp_path / "thresholded.jsonl"
    summary = main(["mine", "--config", str(run.config), "--k", str(K), "--threshold", str(threshold),
                    "--embeddings", str(run.embeddings), "--output", str(output), "--chunk_size", "5", "--no_progress"])
    found = read_lines(output)
    expected, _ = brute_force(run.embeddings, run.rows, threshold)
    assert_same_negatives(found, expected, K)
    counts = {side: [len(line[side]) for line in found] for side in ("audio", "text")}
    assert 0 < sum(counts["audio"]) + sum(counts["text"]) < 2 * K * len(found)
    for side in ("audio", "text"):
        assert summary[f"{side}_mean"] == pytest.approx(sum(counts[side]) / len(found))
        assert summary[f"{side}_none"] == counts[side].count(0)
    out = capsys.readouterr().out
    assert f"mined {len(run.rows)} train clips (k {K}, threshold {threshold})" in out
    assert f"audio: {summary['audio_mean']:.2f} negatives per clip" in out


def test_export_directory_mines_the_same_file(run, tmp_path):
    export = tmp_path / "export"
    main(["export", "--ckpt_path", str(run.ckpt), "--output", str(export)])
    output = tmp_path / "from_export.jsonl"
    main([*run.args, "--ckpt_path", str(export), "--output", str(output)])
    found, reference = read_lines(output), read_lines(run.output)
    assert [(line["id"], [n["id"] for n in line["audio"]], [n["id"] for n in line["text"]]) for line in found] == [
        (line["id"], [n["id"] for n in line["audio"]], [n["id"] for n in line["text"]]) for line in reference]
    for a, b in zip(found, reference):
        for side in ("audio", "text"):
            assert [n["score"] for n in a[side]] == pytest.approx([n["score"] for n in b[side]], abs=1e-6)


def test_reader_returns_the_mined_negatives(run):
    mined = read_mined(run.output, [row["id"] for row in run.rows])
    lines = read_lines(run.output)
    assert list(mined) == [line["id"] for line in lines]
    for line in lines:
        assert mined[line["id"]] == MinedNegatives(
            [(n["id"], n["score"]) for n in line["audio"]], [(n["id"], n["text"], n["score"]) for n in line["text"]])


def test_embeddings_of_another_manifest_are_refused(run, tmp_path):
    copy = tmp_path / "other.safetensors"
    shutil.copy(run.embeddings, copy)
    ids = json.loads(run.embeddings.with_suffix(".json").read_text())
    ids["audio"]["ids"][3] = "intruder"
    copy.with_suffix(".json").write_text(json.dumps(ids))
    with pytest.raises(ValueError, match=r"other\.json: row 3 has clip 'intruder' where the manifest has clip "
                                         rf"'{run.rows[3]['id']}' \(.*dups\.jsonl:4\)"):
        main([*run.args, "--embeddings", str(copy), "--output", str(tmp_path / "x.jsonl")])
    ids = json.loads(run.embeddings.with_suffix(".json").read_text())
    ids["text"]["ids"][2] = ids["text"]["ids"][2].replace("#2", "#7")
    copy.with_suffix(".json").write_text(json.dumps(ids))
    with pytest.raises(ValueError, match=r"other\.json: text id '.*#7' does not follow"):
        main([*run.args, "--embeddings", str(copy), "--output", str(tmp_path / "x.jsonl")])
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("setting, message", [(["--k", "0"], "k must be >= 1"),
                                              (["--threshold", "1.5"], r"threshold must be .* in \[-1, 1\]"),
                                              (["--threshold", "nan"], r"threshold must be")])
def test_bad_settings_are_refused_before_any_work(setting, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        main(["mine", "--config", DEMO, "--ckpt_path", str(tmp_path / "missing.ckpt"), *setting])


def test_predict_on_names_the_set_to_embed(run):
    datamodule = SyntheticDataModule(root=str(run.root / "data"), **SIZES)
    datamodule.prepare_data()
    datamodule.predict_on("test")
    with pytest.raises(ValueError, match=r"several sets \['synthetic', 'synthetic_qa', 'synthetic_zs', 'synthetic_zs_multi'\]"):
        datamodule.predict_records()
    datamodule.predict_on("test", "synthetic_qa")
    with pytest.raises(ValueError, match="QA set"):
        datamodule.predict_records()
    datamodule.predict_on("test", "synthetic")
    test_ids = [row["id"] for row in read_lines(datamodule.manifests["predict"])]
    assert [r.id for r in datamodule.predict_records()] == test_ids
    datamodule.predict_on("train")
    assert [r.id for r in datamodule.predict_records()] == [row["id"] for row in read_lines(datamodule.manifests["train"])]


def random_split(count=60, seed=0):
    """Random embeddings of ``count`` clips with 1-3 captions each; some clips share an audio file
    or a caption."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        captions = [f"caption {i} {j}" for j in range(1 + i % 3)]
        if i % 11 == 5:
            captions.append(f"Caption {i - 3} 0.")  # shares a caption with clip i - 3
        audio = f"/data/clip{i - 1 if i % 13 == 7 else i}.wav"  # clip i - 1's file
        rows.append({"id": f"c{i}", "audio": audio, "caption": captions})
    text_clip = [i for i, row in enumerate(rows) for _ in row["caption"]]
    embeddings = PredictOutput(
        audio=torch.randn(count, 16, generator=generator), text=torch.randn(len(text_clip), 16, generator=generator),
        text_clip=torch.tensor(text_clip), clip_ids=[row["id"] for row in rows],
        text_ids=[f"{row['id']}#{j}" for row in rows for j in range(len(row["caption"]))],
        texts=[c for row in rows for c in row["caption"]],
    )
    return rows, embeddings


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_mine_negatives_in_many_chunks_matches_the_brute_force(device, threshold):
    rows, embeddings = random_split()
    found = list(mine_negatives(embeddings, [row["audio"] for row in rows], k=5, threshold=threshold, chunk_size=7,
                                device=device, progress=False))
    expected, _ = brute_force_tensors(embeddings.audio, embeddings.text, embeddings.clip_ids, embeddings.text_ids,
                                      embeddings.texts, rows, threshold)
    assert_same_negatives(found, expected, 5)
    lengths = [len(line[side]) for line in found for side in ("audio", "text")]
    assert max(lengths) == 5 and (min(lengths) == 5 if threshold is None else min(lengths) < 5)


GOOD = {"id": "a", "audio": [{"id": "b", "score": 0.5}], "text": [{"id": "b#1", "clip": "b", "text": "t", "score": 0.4}]}


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"id": "c", "audio": []}), "no 'text' field"),
    (json.dumps({**GOOD, "id": "z"}), "clip 'z' is not in the data set"),
    (json.dumps({**GOOD, "id": "c", "audio": [{"id": "z", "score": 0.1}]}), "names clip 'z', which is not in"),
    (json.dumps({**GOOD, "id": "c", "text": [{"id": "z#0", "clip": "z", "text": "t", "score": 0.1}]}),
     "text negative of clip 'c' names clip 'z'"),
    (json.dumps({**GOOD, "id": "c", "text": [{"id": "a#0", "clip": "b", "text": "t", "score": 0.1}]}),
     "'a#0' is not '<clip id>#<caption index>' of its clip 'b'"),
    (json.dumps({**GOOD, "id": "c", "text": [{"id": "b#0", "clip": "b", "score": 0.1}]}), "no 'text' field"),
    (json.dumps({**GOOD, "id": "c", "audio": [{"id": "c", "score": 0.1}]}), "among its own audio negatives"),
    (json.dumps({**GOOD, "id": "c", "audio": [{"id": "b"}]}), "no 'score' field"),
    (json.dumps({**GOOD, "id": "c", "audio": [{"id": "b", "score": "high"}]}), "'score' must be a finite number"),
    (json.dumps({**GOOD, "id": "c", "audio": ["b"]}), "entries must be objects"),
    (json.dumps(GOOD), "clip 'a' is listed a second time"),
])
def test_reader_names_the_file_and_line_of_bad_input(tmp_path, line, message):
    path = tmp_path / "mined.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    with pytest.raises(ManifestError, match=message) as error:
        read_mined(path, ["a", "b", "c"])
    assert str(error.value).startswith(f"{path}:3: ")
    assert error.value.source == f"{path}:3"


@pytest.mark.slow
def test_mine_under_two_processes_writes_the_same_negatives(run, tmp_path):
    """Plain DDP re-runs the command line per rank, so this runs main.py in a subprocess."""
    output = tmp_path / "ddp.jsonl"
    subprocess.run([sys.executable, str(ROOT / "main.py"), *run.args, "--ckpt_path", str(run.ckpt), "--output",
                    str(output), "--trainer.devices", "2", "--trainer.strategy", "ddp",
                    "--data.init_args.eval_batch_size", "3"], check=True, cwd=tmp_path)
    found = read_lines(output)
    expected, _ = brute_force(output.with_name("ddp.embeddings.safetensors"), run.rows, None)
    assert_same_negatives(found, expected, K)
    for a, b in zip(found, read_lines(run.output)):
        for side in ("audio", "text"):
            assert [n["score"] for n in a[side]] == pytest.approx([n["score"] for n in b[side]], abs=1e-6)
