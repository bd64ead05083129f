"""Every YAML in configs/ runs through the real CLI.

Each recipe (with its tiny overlay ``configs/tiny/<name>.yaml`` where it names a real checkpoint) runs
its whole life on small synthetic data: ``fit`` for two steps and a validation, writing a checkpoint;
``test`` with that checkpoint, which writes the metrics report; ``predict`` with it, which writes the
embeddings file. The re-ranker recipes have no ``predict`` (``RerankModule`` scores pairs, it writes no
embeddings): they run fit → test. Overlays (ablations, strategies) smoke-run on top of the demo recipe
with ``--trainer.fast_dev_run``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from datamodules.synthetic import make_synthetic_dataset
from main import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(p for p in CONFIGS.glob("*.yaml"))
OVERLAYS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent != CONFIGS and p.parent.name != "tiny")
if (CONFIGS / "sweeps").is_dir():
    OVERLAYS = [p for p in OVERLAYS if "sweeps" not in p.parts]
QUIET = ["--trainer.enable_progress_bar", "false"]
#: the synthetic data every recipe run shares (generated once per module).
SIZES = {"num_train": 8, "num_val": 4, "num_test": 6, "num_hard_pairs": 2}


def config_args(recipe: Path) -> list[str]:
    args = ["--config", str(recipe)]
    tiny = CONFIGS / "tiny" / recipe.name
    if tiny.exists():
        args += ["--config", str(tiny)]
    return args


def recipe_yaml(recipe: Path) -> dict:
    return yaml.safe_load(recipe.read_text()) or {}


def is_reranker(recipe: Path) -> bool:
    return (recipe_yaml(recipe).get("model") or {}).get("class_path") == "RerankModule"


def is_synthetic(recipe: Path) -> bool:
    """Whether the recipe (with its tiny overlay) trains on ``SyntheticDataModule``."""
    data = [recipe_yaml(path).get("data") or {} for path in (recipe, CONFIGS / "tiny" / recipe.name) if path.exists()]
    return [d.get("class_path") for d in data if d.get("class_path")][-1] == "SyntheticDataModule"


def smoke(args: list[str], tmp_path: Path) -> None:
    # conftest.py restores the environment and process group that strategy overlays leave behind
    main(["fit", *args, "--trainer.fast_dev_run", "2", "--trainer.default_root_dir", str(tmp_path),
          "--test_after_fit", "false", *QUIET])


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> SimpleNamespace:
    """The synthetic dataset of every recipe run, its manifests, and the settings that select it:
    ``synthetic`` for recipes on ``SyntheticDataModule``, ``manifests`` (test and predict manifests)
    for those on ``RetrievalDataModule``."""
    root = tmp_path_factory.mktemp("data")
    paths = make_synthetic_dataset(str(root), seed=0, **SIZES)
    synthetic = ["--data.init_args.root", str(root)]
    for name, value in SIZES.items():
        synthetic += [f"--data.init_args.{name}", str(value)]
    manifests = ["--data.init_args.test_manifest", paths["test"], "--data.init_args.predict_manifest", paths["test"]]
    return SimpleNamespace(paths=paths, synthetic=synthetic, manifests=manifests)


@pytest.fixture(scope="module")
def embedding_run(small_data, tmp_path_factory) -> list[str]:
    """What a re-ranker recipe needs from stage 1: a demo embedding checkpoint and its mined negatives
    (two training steps), as settings for the re-ranker's command line."""
    root = tmp_path_factory.mktemp("stage1")
    batch = ["--data.init_args.batch_size", "4"]
    main(["fit", "--config", str(CONFIGS / "demo.yaml"), *small_data.synthetic, *batch, "--trainer.max_steps", "2",
          "--trainer.default_root_dir", str(root / "runs"), "--test_after_fit", "false", *QUIET,
          "--trainer.limit_val_batches", "0"])
    ckpt = next((root / "runs").rglob("last.ckpt"))
    main(["mine", "--config", str(CONFIGS / "demo.yaml"), *small_data.synthetic, "--ckpt_path", str(ckpt),
          "--output", str(root / "mined.jsonl"), "--threshold", "none", "--k", "4"])
    return ["--model.init_args.embedding_ckpt", str(ckpt), "--data.init_args.mined_negatives",
            str(root / "mined.jsonl"), "--model.init_args.k", "3"]


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def assert_holds_checkpoint(cli, ckpt: Path) -> None:
    """The CLI's model carries the checkpoint's weights (so ``--ckpt_path`` was used)."""
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    current, params = cli.model.state_dict(), dict(cli.model.named_parameters())
    assert any(params[key].requires_grad for key in saved if key in params)  # the trained weights are in it
    for key, value in saved.items():
        assert torch.equal(current[key], value), key


def expected_test_keys(recipe: Path) -> set[str]:
    if is_reranker(recipe):
        return {"test/t2a/R@1", "test/a2t/mAP@10", "test/rerank/t2a/R@1", "test/rerank/a2t/R@1",
                "test/rerank/alpha_t2a", "test/rerank/alpha_a2t", "test/rerank/k"}
    if is_synthetic(recipe):
        return {"test/synthetic/t2a/R@1", "test/synthetic/a2t/mAP@10", "test/synthetic/t2t/R@1",
                "test/synthetic/diag/modality_gap", "test/synthetic_order/hn/HNSR@1", "test/synthetic_qa/qa/accuracy",
                "test/synthetic_zs/zs/top1", "test/synthetic_zs_multi/zs/mAP", "test/synthetic/n_audios"}
    return {"test/t2a/R@1", "test/t2a/medr", "test/a2t/mAP@10", "test/n_audios"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_fits_tests_and_predicts_through_the_cli(recipe, tmp_path, request, small_data):
    data = small_data.synthetic if is_synthetic(recipe) else small_data.manifests
    extra = request.getfixturevalue("embedding_run") if is_reranker(recipe) else []
    args = [*config_args(recipe), *data, *extra, *QUIET]

    # fit: two steps, then the end-of-epoch validation, which the checkpoint monitors
    fit = main(["fit", *args, "--data.init_args.batch_size", "4", "--trainer.max_epochs", "1",
                "--trainer.max_steps", "2", "--trainer.limit_train_batches", "2", "--trainer.num_sanity_val_steps",
                "0", "--trainer.default_root_dir", str(tmp_path / "fit"), "--test_after_fit", "false"])
    assert fit.trainer.global_step == 2
    assert math.isfinite(float(fit.trainer.callback_metrics["train/loss"]))
    checkpoint = fit.trainer.checkpoint_callback
    if checkpoint.monitor is not None:
        assert math.isfinite(float(fit.trainer.callback_metrics[checkpoint.monitor])), checkpoint.monitor
        assert checkpoint.best_model_path and math.isfinite(float(checkpoint.best_model_score))
    ckpt = Path(checkpoint.last_model_path)
    assert ckpt.name == "last.ckpt" and ckpt.is_file()

    # test with the checkpoint: the report holds each set's metrics, finite and in range
    test = main(["test", *args, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(tmp_path / "test")])
    assert_holds_checkpoint(test, ckpt)
    report = Path(test.trainer.log_dir) / "test_metrics.json"
    metrics = json.loads(report.read_text())
    assert expected_test_keys(recipe) <= metrics.keys(), sorted(metrics)
    assert all(math.isfinite(value) for value in metrics.values())
    for key, value in metrics.items():
        if any(part.startswith(("R@", "mAP", "HNSR", "top", "accuracy")) for part in key.split("/")):
            assert 0 <= value <= 100, (key, value)
    if is_synthetic(recipe) and not is_reranker(recipe):
        assert metrics["test/synthetic/n_audios"] == SIZES["num_test"]
    if is_reranker(recipe):
        alpha = torch.load(ckpt, map_location="cpu", weights_only=True)["rerank_alpha"]  # chosen on val by fit
        assert metrics["test/rerank/alpha_t2a"] == pytest.approx(alpha["t2a"])
        assert metrics["test/rerank/alpha_a2t"] == pytest.approx(alpha["a2t"])
        return  # RerankModule has no predict step

    # predict with the checkpoint: one row per clip of the predict set and per caption, of the model's width
    predict = main(["predict", *args, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(tmp_path / "predict")])
    assert_holds_checkpoint(predict, ckpt)
    tensors = load_file(str(Path(predict.trainer.log_dir) / "embeddings.safetensors"))
    rows = read_jsonl(small_data.paths["test"])  # the predict set of both data modules
    captions = [(clip, text) for clip, row in enumerate(rows) for text in row["caption"]]
    head = predict.config["predict"]["model"]["head"]
    dim = (head.get("init_args") or {}).get("out_features") or predict.model.backbone.hidden_size
    assert tensors["audio"].shape == (len(rows), dim)
    assert tensors["text"].shape == (len(captions), dim)
    assert tensors["text_clip"].tolist() == [clip for clip, _ in captions]
    for side in ("audio", "text"):
        assert torch.isfinite(tensors[side]).all()
        torch.testing.assert_close(tensors[side].norm(dim=-1), torch.ones(len(tensors[side])), atol=1e-5, rtol=0)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_overlay_smoke_runs_on_demo(overlay, tmp_path):
    smoke(["--config", str(CONFIGS / "demo.yaml"), "--config", str(overlay)], tmp_path)


def test_help_documents_components(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    for key in ["--model.backbone", "--model.pooler", "--model.loss", "--model.warmup_steps", "--data",
                "--test_after_fit", "--checkpoint.monitor", "--progress.every_n_batches", "--progress.style"]:
        assert key in text, key
