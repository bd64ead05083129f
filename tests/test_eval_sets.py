"""Several evaluation sets per run: set definitions, bad input, the module's per-set metrics against
the float64 brute-force references of tests/references.py on independently embedded sets, speech–text
and QA sets, reports and the embedding projector."""

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import soundfile as sf
import torch
from lightning.pytorch.loggers import TensorBoardLogger

import builders
from callbacks import EmbeddingProjector, RetrievalReport
from callbacks.report import format_markdown, split_key
from datamodules import AudioPolicy, EvalDataset, RetrievalDataModule
from datamodules.eval_sets import (
    EvalSet,
    classification_layout,
    qa_layout,
    query_type_layout,
    read_classes,
    read_hard_negatives,
)
from datamodules.manifest import ManifestError, read_manifest
from lightning_modules.evaluation import mean_over_sets
from datamodules.inputs import EmbedInput
from references import (
    diagnostics_reference,
    hard_negative_reference,
    qa_reference,
    retrieval_reference,
    text_text_reference,
    zero_shot_reference,
)


def write_clips(folder: Path, rows: list[dict], seconds: float = 0.5) -> Path:
    """Tones of distinct pitch for each row, and a JSONL manifest of the rows."""
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    t = np.arange(int(16000 * seconds)) / 16000
    for i, row in enumerate(rows):
        sf.write(folder / "audio" / f"{row['id']}.wav", 0.3 * np.sin(2 * np.pi * (200 + 90 * i) * t), 16000)
        row.setdefault("audio", f"audio/{row['id']}.wav")
    manifest = folder / "set.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


# ----------------------------------------------------------------------------- definitions, bad input


def test_hard_negative_file_errors_name_file_and_line(tmp_path):
    records = read_manifest(str(write_clips(tmp_path, [{"id": "a", "caption": "x"}, {"id": "b", "caption": "y"}])))
    path = tmp_path / "hn.jsonl"
    cases = {
        '{"query": "x", "target": "a", "negative": "zzz"}': "negative 'zzz' is not a clip id",
        '{"query": "x", "target": "nope", "negative": "b"}': "target 'nope' is not a clip id",
        '{"query": "x", "target": "a", "negative": "a"}': "same clip",
        '{"query": "", "target": "a", "negative": "b"}': "'query' must be a non-empty string",
        '{"query": "x", "target": "a"': "invalid JSON",
    }
    for line, message in cases.items():
        path.write_text('{"query": "fine", "target": "b", "negative": "a"}\n\n' + line + "\n")
        with pytest.raises(ManifestError, match=message) as err:
            read_hard_negatives(str(path), records)
        assert f"{path}:3" in str(err.value)
    path.write_text("\n")
    with pytest.raises(ManifestError, match="no triples"):
        read_hard_negatives(str(path), records)
    path.write_text('{"query": "q", "target": "b", "negative": "a"}\n')
    (triple,) = read_hard_negatives(str(path), records)
    assert (triple.query, triple.target, triple.negative) == ("q", 1, 0)


def test_qa_answer_must_be_among_the_choices(tmp_path):
    rows = [{"id": "a", "question": "what?", "answer": "dog", "choices": ["cat", " dog "], "category": "animal"},
            {"id": "b", "question": "what?", "answer": "a car", "choices": ["car", "bus"]}]  # fmt: skip
    manifest = write_clips(tmp_path, rows)
    records = read_manifest(str(manifest))
    with pytest.raises(ManifestError, match=r"answer 'a car' is not among the choices") as err:
        qa_layout(records, "category")
    assert f"{manifest}:2" in str(err.value)
    answers, categories, names = qa_layout(records[:1], "category")
    assert (answers, categories, names) == ([1], [0], ["animal"])


def test_empty_evaluation_set_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    train = write_clips(tmp_path, [{"id": "a", "caption": "x"}])
    dm = RetrievalDataModule(train_manifest=str(train), test_sets={"clotho": EvalSet(str(tmp_path / "empty.jsonl"))})
    with pytest.raises(ManifestError, match=r"empty.jsonl: evaluation set 'clotho' has no clips"):
        dm.setup("test")
    dm = RetrievalDataModule(val_manifest=str(tmp_path / "empty.jsonl"))
    with pytest.raises(ManifestError, match=r"empty.jsonl: the val set has no clips"):
        dm.setup("validate")


def test_set_definitions_are_checked(tmp_path):
    with pytest.raises(ValueError, match="either test_manifest or test_sets"):
        RetrievalDataModule(test_manifest="a.jsonl", test_sets={"x": EvalSet("b.jsonl")})
    for name in ("t2a", "qa", "zs", "chance", "n_audios", "", "a/b"):
        with pytest.raises(ValueError, match="invalid evaluation set name"):
            RetrievalDataModule(test_sets={name: EvalSet("b.jsonl")})
    with pytest.raises(ValueError, match="unknown evaluation task"):
        EvalSet("b.jsonl", task="music")
    with pytest.raises(ValueError, match="need a retrieval task"):
        EvalSet("b.jsonl", task="qa", hard_negatives="hn.jsonl")
    dm = RetrievalDataModule(test_sets={"clotho": {"manifest": "c.jsonl", "text_text": True}})
    (name, spec), = dm.eval_sets("test")
    assert name == "clotho" and isinstance(spec, EvalSet) and spec.text_text


def test_mean_over_sets_averages_recalls_of_named_sets_only():
    values = {"val/a/t2a/R@1": torch.tensor(10.0), "val/b/t2a/R@1": torch.tensor(30.0),
              "val/a/t2a/medr": torch.tensor(3.0), "val/b/t2s/R@1": torch.tensor(99.0),
              "val/a/a2t/mAP@10": torch.tensor(5.0), "val/a/chance/t2a/R@1": torch.tensor(1.0),
              "val/b/chance/t2a/R@1": torch.tensor(2.0), "val/a/t2a/question/R@1": torch.tensor(7.0),
              "val/a/n_audios": torch.tensor(100.0)}  # fmt: skip
    assert {k: float(v) for k, v in mean_over_sets(values, "val").items()} == {
        "val/t2a/R@1": 20.0, "val/a2t/mAP@10": 5.0, "val/chance/t2a/R@1": 1.5
    }
    # the unnamed set's keys have no set level: nothing to average, the chance levels included
    assert mean_over_sets({"val/t2a/R@1": torch.tensor(1.0), "val/chance/t2a/R@1": torch.tensor(1.0)}, "val") == {}


def test_report_key_layout_and_markdown():
    results = {"test/t2a/R@1": 1.0, "test/clotho/t2a/R@1": 2.0, "test/clotho/hn/HNSR@1": 3.0,
               "test/mmau/qa/accuracy/sound": 4.0, "test/clotho/diag/mmd": 0.5, "test/clotho/chance/t2a/R@1": 0.1,
               "test/clotho/t2a/question/R@1": 5.0, "test/clotho/n_audios": 1045.0, "test/clotho/n_texts": 5225.0,
               "test/esc50/zs/top1": 6.0, "test/esc50/chance/zs/top1": 2.0, "test/esc50/n_queries": 2000.0,
               "test/n_audios": 10.0}  # fmt: skip
    assert split_key("test/t2a/R@1") == ("all", "t2a", "R@1", "")
    assert split_key("test/mmau/qa/accuracy/sound") == ("mmau", "qa", "accuracy/sound", "")
    assert split_key("test/clotho/chance/t2a/R@1") == ("clotho", "t2a", "R@1", "chance")
    assert split_key("test/clotho/t2a/question/R@1") == ("clotho", "t2a", "R@1", "question")
    assert split_key("test/clotho/n_audios") == ("clotho", "sizes", "n_audios", "")
    assert split_key("test/n_audios") == ("all", "sizes", "n_audios", "")
    text = format_markdown(results)
    assert "| all | t2a | 1.00 |" in text and "| clotho | t2a | 2.00 |" in text
    assert "| clotho | hn | 3.00 |" in text and "| mmau | qa | 4.00 |" in text and "| clotho | diag | 0.50 |" in text
    # chance right under its group, then the query types
    assert "| clotho | t2a | 2.00 |\n| clotho | t2a chance | 0.10 |\n| clotho | t2a/question | 5.00 |" in text
    assert "| esc50 | zs | 6.00 |\n| esc50 | zs chance | 2.00 |" in text
    assert "| set | n_audios | n_texts | n_queries |" in text
    assert "| clotho | 1045 | 5225 |  |" in text and "| esc50 |  |  | 2000 |" in text and "| all | 10 |  |  |" in text
    assert "| 0.00123 |" in format_markdown({"test/x/diag/mmd": 0.00123})


# ----------------------------------------------------------------------------- end to end


def embed_set(module, dataset, batch_size=8):
    """Independent recomputation: embed every item of an evaluation dataset with ``module.embed``."""
    audio, audio_ids, text, text_ids, text_keys, answers, categories = [], [], [], [], [], [], []
    with torch.no_grad():
        for begin in range(0, len(dataset), batch_size):
            batch = module.collate([dataset[i] for i in range(begin, min(len(dataset), begin + batch_size))])
            query, document = module.embed_batch(batch)
            audio.append(query), audio_ids.append(batch["query_index"])
            text.append(document), text_ids.append(batch["document_index"]), text_keys.append(batch["document_key"])
            answers.append(batch.get("answer_key", torch.zeros(0))), categories.append(batch.get("category_index"))
    return (torch.cat(audio), torch.cat(audio_ids), torch.cat(text), torch.cat(text_ids), torch.cat(text_keys),
            torch.cat(answers), categories)  # fmt: skip


@pytest.fixture(scope="module")
def tested(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsuite")
    module = builders.tiny_module(manual_seed=0)
    dm = builders.synthetic_datamodule(root / "data", module, num_test=12, num_hard_pairs=3, eval_batch_size=5)
    report, projector = RetrievalReport(), EmbeddingProjector(max_samples=5)
    trainer = builders.quiet_trainer(logger=TensorBoardLogger(str(root), name="tb"), callbacks=[report, projector])
    trainer.test(module, datamodule=dm)
    return module, dm, report, projector, trainer


def test_every_set_is_reported_under_its_name(tested):
    module, dm, _, _, _ = tested
    results = module.test_results
    assert [name for name, _ in dm.eval_sets("test")] == [
        "synthetic", "synthetic_order", "synthetic_qa", "synthetic_zs", "synthetic_zs_multi"
    ]  # fmt: skip
    for key in ("synthetic/t2a/R@1", "synthetic/a2t/mAP@10", "synthetic/t2t/R@5", "synthetic/diag/modality_gap",
                "synthetic_order/hn/HNSR@1", "synthetic_order/hn/delta_rank_mean", "synthetic_qa/qa/accuracy",
                "synthetic_qa/qa/accuracy/order", "synthetic_qa/qa/accuracy/count", "synthetic_zs/zs/top1",
                "synthetic_zs/zs/top5", "synthetic_zs_multi/zs/mAP"):  # fmt: skip
        assert f"test/{key}" in results, key
    assert not any(k.startswith("test/synthetic_qa/t2a") for k in results)
    assert not any(k.startswith(("test/synthetic_zs/t2a", "test/synthetic_zs_multi/zs/top")) for k in results)
    sizes = {name: [results[f"test/{name}/{k}"] for k in ("n_audios", "n_texts")] for name in
             ("synthetic", "synthetic_order", "synthetic_qa", "synthetic_zs", "synthetic_zs_multi")}  # fmt: skip
    # 12 test clips x 5 captions; 3 mirrored pairs; one question per test clip (3-4 choices);
    # 6 single-event clips of 6 different types; the test clips against the 10 event types
    assert sizes["synthetic"] == [12, 60] and sizes["synthetic_order"] == [6, 30]
    assert sizes["synthetic_qa"][0] == 12 and 36 <= sizes["synthetic_qa"][1] <= 48
    assert sizes["synthetic_zs"] == [6, 6] and sizes["synthetic_zs_multi"] == [12, 10]
    assert results["test/synthetic/chance/t2a/R@1"] == pytest.approx(100 / 12)
    assert results["test/synthetic_zs/chance/zs/top5"] == pytest.approx(100 * 5 / 6)
    assert results["test/t2a/R@1"] == pytest.approx(
        (results["test/synthetic/t2a/R@1"] + results["test/synthetic_order/t2a/R@1"]) / 2
    )


def test_module_metrics_match_the_references_on_independently_embedded_sets(tested):
    module, dm, _, _, _ = tested
    results = module.test_results
    module.eval()

    def dataset(name, **kwargs):
        return EvalDataset(dm.set_records("test", name), 16000, dm.eval_policy, **kwargs)

    a, a_ids, t, t_ids, t_keys, _, _ = embed_set(module, dataset("synthetic"))
    expected = {**retrieval_reference(a, a_ids, t, t_ids, t_keys), **text_text_reference(t, t_ids, t_keys),
                **diagnostics_reference(a, a_ids, t, t_ids)}  # fmt: skip
    for key, value in expected.items():
        assert results[f"test/synthetic/{key}"] == pytest.approx(float(value), abs=1e-4), key

    a, a_ids, t, t_ids, t_keys, _, _ = embed_set(module, dataset("synthetic_order"))
    triples = dm.hard_negatives("test", "synthetic_order")
    texts = [EmbedInput(text=triple.query) for triple in triples]
    with torch.no_grad():
        queries = module.embed(module.collate.backbone_collator(texts), "text")
    assert torch.equal(a_ids, torch.arange(len(a_ids)))  # row i is clip i, so triple positions index rows
    expected = hard_negative_reference(queries, a, torch.tensor([x.target for x in triples]),
                                       torch.tensor([x.negative for x in triples]))  # fmt: skip
    for key, value in expected.items():
        assert results[f"test/synthetic_order/{key}"] == pytest.approx(float(value), abs=1e-4), key

    records = dm.set_records("test", "synthetic_qa")
    answers, categories, names = qa_layout(records, "category")
    q, _, c, c_item, _, _, _ = embed_set(module, dataset("synthetic_qa", qa=(answers, categories)))
    first_choice = torch.searchsorted(c_item, torch.arange(len(records)))
    expected = qa_reference(q, c, c_item, first_choice + torch.tensor(answers), torch.tensor(categories), names)
    for key, value in expected.items():
        assert results[f"test/synthetic_qa/{key}"] == pytest.approx(float(value), abs=1e-4), key

    for name, multi_label in (("synthetic_zs", False), ("synthetic_zs_multi", True)):
        clips = dataset(name, with_documents=False)
        with torch.no_grad():
            batch = module.collate([clips[i] for i in range(len(clips))])
            assert batch["document"] is None
            audio = module.embed(batch["query"], batch["query_modality"])
        # labels and class names straight from the manifest rows, prompts from the two templates
        rows = [json.loads(line) for line in Path(dm.eval_sets("test")[-1 if multi_label else -2][1].manifest).open()]
        labels = [row["labels"] if multi_label else [row["label"]] for row in rows]
        classes = sorted({label for row in labels for label in row})
        templates = ["This is a sound of {label}.", "the sound of a {label}"]
        with torch.no_grad():
            prompts = [EmbedInput(text=t.format(label=c)) for c in classes for t in templates]
            per_prompt = module.embed(module.collate.backbone_collator(prompts), "text").view(len(classes), 2, -1)
        class_emb = torch.nn.functional.normalize(per_prompt.mean(1), dim=-1)
        targets = torch.tensor([[c in row for c in classes] for row in labels])
        expected = zero_shot_reference(audio, class_emb, targets, multi_label)
        assert sorted(expected) == (["zs/mAP"] if multi_label else ["zs/top1", "zs/top5"])
        for key, value in expected.items():
            assert results[f"test/{name}/{key}"] == pytest.approx(float(value), abs=1e-4), key


def test_classification_set_definitions_and_bad_labels(tmp_path):
    with pytest.raises(ValueError, match="no {label} field"):
        EvalSet("b.jsonl", task="classification", templates=["a sound"])
    with pytest.raises(ValueError, match="may only use the field"):
        EvalSet("b.jsonl", task="classification", templates=["{label} {other}"])
    with pytest.raises(ValueError, match="need a retrieval task"):
        EvalSet("b.jsonl", task="classification", text_text=True)
    rows = [{"id": "a", "label": "dog"}, {"id": "b", "label": "cat"}, {"id": "c", "labels": ["dog"]}]
    manifest = write_clips(tmp_path, rows)
    records = read_manifest(str(manifest))
    assert records[0].captions == [] and records[0].extra["label"] == "dog"
    with pytest.raises(ManifestError, match="mixes 'label' and 'labels'") as err:
        classification_layout(records)
    assert f"{manifest}:3" in str(err.value)
    layout = classification_layout(records[:2])
    assert (layout.classes, layout.targets, layout.multi_label) == (["cat", "dog"], [[1], [0]], False)
    assert layout.prompts(["a {label}", "{label}!"]) == ["a cat", "cat!", "a dog", "dog!"]
    classes = tmp_path / "classes.txt"
    classes.write_text("dog\n\nbird\n")
    with pytest.raises(ManifestError, match="label 'cat' is not a class of") as err:
        classification_layout(records[:2], str(classes))
    assert f"{manifest}:2" in str(err.value)
    classes.write_text("dog\ncat\nbird\n")
    layout = classification_layout(records[:2], str(classes))
    assert layout.classes == ["dog", "cat", "bird"] and layout.targets == [[0], [1]]
    classes.write_text("dog\ncat\ndog\n")
    with pytest.raises(ManifestError, match=r"classes.txt:3: class 'dog' repeats line 1"):
        read_classes(str(classes))
    (tmp_path / "none.jsonl").write_text(json.dumps({"audio": "audio/a.wav", "caption": "x"}) + "\n")
    with pytest.raises(ManifestError, match="needs exactly one of 'label'"):
        classification_layout(read_manifest(str(tmp_path / "none.jsonl")))


def test_query_types_are_checked_and_reported_per_type(tmp_path, quiet_trainer, tiny_module):
    rows = [{"id": f"c{i}", "caption": [f"tone {i}", f"which tone is {i}?"], "query_type": ["keyphrase", "question"]}
            for i in range(4)]  # fmt: skip
    rows += [{"id": "c4", "caption": "tone 4", "query_type": "keyphrase"}, {"id": "c5", "caption": "x"}]
    manifest = write_clips(tmp_path, rows)
    records = read_manifest(str(manifest))
    per_clip, names = query_type_layout(records, "caption")
    assert names == ["keyphrase", "question"] and per_clip == [[0, 1]] * 4 + [[0], [-1]]
    assert query_type_layout(records[5:], "caption") is None
    bad = write_clips(tmp_path / "bad", [{"id": "a", "caption": ["x", "y"], "query_type": ["question"]}])
    with pytest.raises(ManifestError, match="'query_type' has 1 entries for the row's 2 'caption' texts") as err:
        query_type_layout(read_manifest(str(bad)), "caption")
    assert f"{bad}:1" in str(err.value)

    module = tiny_module(manual_seed=0)
    dm = RetrievalDataModule(test_manifest=str(manifest), eval_batch_size=4)
    dm.bind(module.backbone.sampling_rate, module.collate)
    quiet_trainer().test(module, datamodule=dm)
    results = module.test_results
    module.eval()
    a, a_ids, t, t_ids, t_keys, _, _ = embed_set(module, EvalDataset(records, 16000, dm.eval_policy))
    types = torch.tensor([per_clip[key // 1000][key % 1000] for key in t_keys.tolist()])
    expected = retrieval_reference(a, a_ids, t, t_ids, t_keys, text_groups=types, group_names=names)
    metrics = ("R@1", "R@5", "R@10", "mAP@10", "medr", "meanr")
    assert {k for k in expected if k.count("/") == 2} == {f"t2a/{n}/{m}" for n in names for m in metrics}
    for key, value in expected.items():
        assert results[f"test/{key}"] == pytest.approx(float(value), abs=1e-4), key


def test_reports_are_written(tested):
    module, _, report, _, trainer = tested
    assert json.loads(Path(report.path).read_text()) == pytest.approx(module.test_results)
    markdown = Path(report.markdown_path).read_text()
    for title in ("### Set sizes", "### Retrieval", "### Zero-shot classification", "### Hard negatives",
                  "### QA by retrieval", "### Embedding diagnostics"):  # fmt: skip
        assert title in markdown
    assert f"| synthetic_zs_multi | zs | {module.test_results['test/synthetic_zs_multi/zs/mAP']:.2f} |" in markdown
    assert "| synthetic | t2a chance | 8.33 |" in markdown  # 12 test clips
    assert f"| synthetic_order | t2a | {module.test_results['test/synthetic_order/t2a/R@1']:.2f} |" in markdown
    assert Path(report.plot_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(report.path).parent == Path(trainer.log_dir)


def test_projector_logs_both_modalities(tested):
    _, dm, _, projector, trainer = tested
    assert projector.tags == ["test/synthetic", "test/synthetic_order"]
    config = (Path(trainer.log_dir) / "projector_config.pbtxt").read_text()
    assert config.count("tensor_name") == 2
    files = sorted(Path(trainer.log_dir).rglob("metadata.tsv"))
    assert len(files) == 2
    for path in files:
        rows = [line.split("\t") for line in path.read_text().splitlines()]
        assert rows[0] == ["modality", "clip", "text"]
        audio_rows = [r for r in rows[1:] if r[0] == "audio"]
        text_rows = [r for r in rows[1:] if r[0] == "text"]
        name = "synthetic_order" if audio_rows[0][1].startswith("hard") else "synthetic"
        by_id = {r.id: r for r in dm.set_records("test", name)}
        assert len(audio_rows) == 5 and len(text_rows) == 25  # 5 clips with their 5 captions each
        assert all(text in by_id[clip].captions for _, clip, text in text_rows)


def test_partial_evaluation_scores_the_hard_negatives_it_can(tmp_path, quiet_trainer, synthetic_datamodule, tiny_module):
    module = tiny_module(manual_seed=0)
    dm = synthetic_datamodule(module, num_hard_pairs=4, eval_batch_size=3)
    quiet_trainer(limit_test_batches=1).test(module, datamodule=dm)
    # the first batch holds clips 0-2 = pairs 0 (a, b) and half of pair 1: only pair 0's two triples count
    assert module.test_results["test/synthetic_order/n_queries"] == 2
    assert "test/synthetic_order/hn/HNSR@1" in module.test_results


def test_speech_text_set_and_question_field(tmp_path, quiet_trainer, tiny_module):
    rows = [{"id": f"s{i}", "caption": f"transcript number {i}", "question": f"question {i}?", "answer": "x"}
            for i in range(6)]  # fmt: skip
    manifest = str(write_clips(tmp_path, rows))
    records = read_manifest(manifest)
    spoken = EvalDataset(records, 16000, AudioPolicy(), text_field="question")
    item = spoken[2]
    # speech -> text retrieval embeds the speech alone; the question is the document
    assert item["query"].text is None and [d.text for d in item["documents"]] == ["question 2?"]
    qa_style = EvalDataset(records, 16000, AudioPolicy())
    assert qa_style[2]["query"].text == "question 2?"

    module = tiny_module(manual_seed=0)
    dm = RetrievalDataModule(test_sets={"speech": EvalSet(manifest, task="speech_text", text_field="question")},
                             eval_batch_size=4)  # fmt: skip
    dm.bind(module.backbone.sampling_rate, module.collate)
    quiet_trainer().test(module, datamodule=dm)
    results = module.test_results
    assert {k.split("/")[2] for k in results} == {"t2s", "s2t", "chance", "n_audios", "n_texts"}
    assert {k.split("/")[3] for k in results if "/chance/" in k} == {"t2s", "s2t"} and "test/t2a/R@1" not in results
    module.eval()
    a, a_ids, t, t_ids, t_keys, _, _ = embed_set(module, spoken)
    expected = retrieval_reference(a, a_ids, t, t_ids, t_keys, names=("t2s", "s2t"))
    for key, value in expected.items():
        assert results[f"test/speech/{key}"] == pytest.approx(float(value), abs=1e-4), key


def test_several_validation_sets_feed_the_checkpoint_monitor(tmp_path, quiet_trainer, tiny_module):
    a = str(write_clips(tmp_path / "a", [{"id": f"a{i}", "caption": f"tone {i}"} for i in range(5)]))
    b = str(write_clips(tmp_path / "b", [{"id": f"b{i}", "caption": [f"tone {i}", f"pitch {i}"]} for i in range(4)]))
    module = tiny_module(manual_seed=0)
    dm = RetrievalDataModule(train_manifest=a, val_sets={"first": EvalSet(a), "second": EvalSet(b, text_text=True)},
                             batch_size=5)  # fmt: skip
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val/t2a/R@1", mode="max")
    trainer = quiet_trainer(max_steps=1, callbacks=[checkpoint], num_sanity_val_steps=0)
    dm.bind(module.backbone.sampling_rate, module.collate)
    trainer.fit(module, datamodule=dm)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert "val/second/t2t/R@1" in logged and "val/first/t2t/R@1" not in logged
    assert logged["val/t2a/R@1"] == pytest.approx((logged["val/first/t2a/R@1"] + logged["val/second/t2a/R@1"]) / 2)
    assert checkpoint.best_model_score is not None
    assert float(checkpoint.best_model_score) == pytest.approx(logged["val/t2a/R@1"])
