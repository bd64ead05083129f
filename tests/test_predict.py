"""Command-line runs on a 2-step demo model: ``predict`` writes embeddings, ``search`` ranks them,
``EmbeddingModel.from_checkpoint`` reproduces them, and the run's hyper-parameters reach TensorBoard."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from safetensors import safe_open

from callbacks.hparams import HyperparameterSummary, flatten_config
from datamodules import AudioPolicy, EvalDataset, read_manifest
from lightning_modules.tools.encoder import EmbeddingModel, load_embedding_module
from lightning_modules.tools.search import ids_path
from main import main
from references import topk_reference

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")


def small_demo(root: Path) -> list[str]:
    return ["--config", CONFIG, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--data.init_args.root", str(root / "data"), "--data.init_args.num_train", "64",
            "--data.init_args.num_val", "8", "--data.init_args.num_test", "10"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step fit (then test, as the demo does) and a predict with its last checkpoint."""
    root = tmp_path_factory.mktemp("run")
    fit = main(["fit", *small_demo(root), "--trainer.max_steps", "2"])
    ckpt = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    predict = main(["predict", *small_demo(root), "--ckpt_path", str(ckpt)])
    writer = next(c for c in predict.trainer.callbacks if type(c).__name__ == "EmbeddingWriter")
    return SimpleNamespace(fit=fit, ckpt=ckpt, predict=predict, embeddings=writer.path)


def read(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def test_predict_writes_the_manifest_embeddings(run):
    assert run.embeddings == Path(run.predict.trainer.log_dir) / "embeddings.safetensors"
    tensors = read(run.embeddings)
    ids = json.loads(ids_path(run.embeddings).read_text())
    datamodule = run.predict.datamodule
    records = read_manifest(datamodule.manifests["predict"])
    captions = [(r.id, j, c) for r in records for j, c in enumerate(r.captions)]
    assert tensors["audio"].shape[0] == len(records) == len(ids["audio"]["ids"])
    assert tensors["text"].shape[0] == len(captions) == len(ids["text"]["ids"])
    assert ids["audio"]["ids"] == [r.id for r in records]
    assert ids["audio"]["paths"] == [os.path.abspath(r.audio_path) for r in records]
    assert ids["text"]["ids"] == [f"{clip}#{j}" for clip, j, _ in captions]
    assert ids["text"]["texts"] == [c for _, _, c in captions]
    assert tensors["text_clip"].tolist() == [[r.id for r in records].index(clip) for clip, _, _ in captions]

    # The values are module.embed on the same batches, with the weights of the checkpoint.
    module = load_embedding_module(run.ckpt)  # config: <log_dir>/config.yaml beside checkpoints/
    dataset = EvalDataset(records, module.backbone.sampling_rate, datamodule.eval_policy)
    batch = module.collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        audio, text = module.embed_batch(batch)
    torch.testing.assert_close(tensors["audio"], audio, atol=1e-6, rtol=0)
    torch.testing.assert_close(tensors["text"], text, atol=1e-6, rtol=0)


def test_from_checkpoint_encode_reproduces_predict(run):
    model = EmbeddingModel.from_checkpoint(run.ckpt)
    records = read_manifest(run.predict.datamodule.manifests["predict"])
    tensors = read(run.embeddings)
    policy = run.predict.datamodule.eval_policy
    audio = model.encode(audio=[r.audio_path for r in records], batch_size=32, max_seconds=policy.max_seconds)
    torch.testing.assert_close(audio, tensors["audio"], atol=1e-6, rtol=0)
    texts = json.loads(ids_path(run.embeddings).read_text())["text"]["texts"]
    torch.testing.assert_close(model.encode(text=texts, batch_size=64), tensors["text"], atol=1e-6, rtol=0)


def test_search_cli_on_predicted_files(run, tmp_path):
    output = tmp_path / "results.jsonl"
    records = main(["search", "--queries", str(run.embeddings), "--corpus", str(run.embeddings),
                    "--query_key", "text", "--corpus_key", "audio", "--k", "3", "--output", str(output)])
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert lines == records
    tensors = read(run.embeddings)
    ids = json.loads(ids_path(run.embeddings).read_text())
    assert len(lines) == tensors["text"].shape[0]
    # Against the float64 brute-force ranking of every clip: each result's score is its float64 score,
    # and the results are the 3 best scores in order (a float32 near-tie may swap two ids, not scores).
    all_scores, all_indices = topk_reference(tensors["text"], tensors["audio"], tensors["audio"].shape[0])
    row_of = {clip: row for row, clip in enumerate(ids["audio"]["ids"])}
    for line, row_scores, row_indices, query_id in zip(lines, all_scores, all_indices, ids["text"]["ids"]):
        assert line["query"] == query_id and len(line["results"]) == 3
        exact = {index: score for index, score in zip(row_indices, row_scores)}
        got = [r["score"] for r in line["results"]]
        np.testing.assert_allclose(got, [exact[row_of[r["id"]]] for r in line["results"]], rtol=0, atol=1e-6)
        np.testing.assert_allclose(got, row_scores[:3], rtol=0, atol=1e-6)


def test_hparams_reach_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    log_dir = run.fit.trainer.log_dir
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    session = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    hparams = {key: value.number_value or value.string_value for key, value in session.hparams.items()}
    assert hparams["model.loss"].endswith("InfoNCE")
    assert hparams["model.loss.temperature"] == pytest.approx(0.05)
    assert hparams["model.backbone"].endswith("QwenOmniThinker")
    assert hparams["model.learning_rate"] == pytest.approx(1e-3)
    assert hparams["data.batch_size"] == 32
    assert hparams["model.backbone.lora"] == "None"
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    declared = {info.name.tag for info in experiment.metric_infos}
    assert {"final/val/t2a/R@1", "final/test/t2a/R@1", "final/test/a2t/mAP@10"} <= declared

    # TensorBoard shows each metric's last value: the test metrics of the test after fit.
    test_metrics = json.loads((Path(log_dir) / "test_metrics.json").read_text())
    for key, value in test_metrics.items():
        assert events.Scalars(f"final/{key}")[-1].value == pytest.approx(value), key
    assert events.Scalars("final/val/t2a/R@1")[-1].value == pytest.approx(events.Scalars("val/t2a/R@1")[-1].value)


def test_hparams_leaves_other_loggers_alone(tmp_path):
    callback = HyperparameterSummary()
    for loggers in ([], [CSVLogger(tmp_path)]):
        trainer = SimpleNamespace(loggers=loggers, callback_metrics={"val/t2a/R@1": torch.tensor(1.0)},
                                  state=SimpleNamespace(fn="validate"))
        callback.setup(trainer, None, "validate")
        callback.on_validation_end(trainer, None)
        callback.on_test_end(trainer, None)
    assert not any(tmp_path.rglob("*"))


def test_flatten_config():
    config = {"model": {"loss": {"class_path": "losses.InfoNCE", "init_args": {"temperature": 0.05}},
                        "betas": [0.9, 0.999], "policy": AudioPolicy(5.0)}, "seed_everything": 0}
    assert flatten_config(config) == {
        "model.loss": "losses.InfoNCE", "model.loss.temperature": 0.05, "model.betas": "[0.9, 0.999]",
        "model.policy": "AudioPolicy(max_seconds=5.0, min_seconds=0.0)", "seed_everything": 0,
    }


@pytest.mark.slow
def test_predict_under_two_processes_writes_the_same_file(run, tmp_path):
    """Each rank embeds part of the manifest; rank 0 gathers, restores manifest order and writes."""
    out = tmp_path / "ddp"
    # ddp_spawn: plain ddp launches its other ranks by re-running the command line, here pytest.
    main(["predict", *small_demo(tmp_path), "--data.init_args.root", str(Path(run.predict.datamodule.root)),
          "--ckpt_path", str(run.ckpt), "--data.init_args.eval_batch_size", "3", "--trainer.devices", "2",
          "--trainer.strategy", "ddp_spawn", "--writer.output_dir", str(out)])
    single, double = read(run.embeddings), read(out / "embeddings.safetensors")
    assert json.loads(ids_path(out / "embeddings.safetensors").read_text()) == json.loads(
        ids_path(run.embeddings).read_text())
    assert torch.equal(single["text_clip"], double["text_clip"])
    for key in ("audio", "text"):
        torch.testing.assert_close(double[key], single[key], atol=1e-6, rtol=0)
