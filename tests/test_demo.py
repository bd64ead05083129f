"""The demo really learns: README's first command trains, tests and writes metrics, and ``test`` with
the checkpoint reproduces them."""

import json
from pathlib import Path

import pytest

from main import main

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")
CHANCE_T2A_R1 = 100.0 / 100  # percent: 100 test clips, one relevant clip per caption


@pytest.mark.slow
def test_demo_learns_and_test_reproduces(tmp_path):
    cli = main(["fit", "--config", CONFIG, "--trainer.default_root_dir", str(tmp_path),
                "--trainer.enable_progress_bar", "false"])
    report = cli.trainer.callbacks[[type(c).__name__ for c in cli.trainer.callbacks].index("RetrievalReport")]
    fit_metrics = json.loads(Path(report.path).read_text())
    assert fit_metrics["test/t2a/R@1"] >= 5 * CHANCE_T2A_R1, fit_metrics

    best = cli.trainer.checkpoint_callback.best_model_path
    again = main(["test", "--config", CONFIG, "--ckpt_path", best, "--trainer.default_root_dir", str(tmp_path / "t"),
                  "--trainer.enable_progress_bar", "false"])
    report = again.trainer.callbacks[[type(c).__name__ for c in again.trainer.callbacks].index("RetrievalReport")]
    test_metrics = json.loads(Path(report.path).read_text())
    assert test_metrics.keys() == fit_metrics.keys()
    for key, value in fit_metrics.items():
        assert test_metrics[key] == pytest.approx(value, abs=1e-4), key


@pytest.mark.slow
def test_tiny_midashenglm_learns_with_the_alm2vec_setup(tmp_path):
    """Frozen encoder, LoRA on q/k/v, EOS pooling, linear head, learnable τ, margin masking, GradCache."""
    configs = Path(CONFIG).parent
    cli = main(["fit", "--config", str(configs / "alm2vec.yaml"), "--config", str(configs / "tiny" / "alm2vec.yaml"),
                "--test_after_fit", "true", "--trainer.default_root_dir", str(tmp_path),
                "--trainer.enable_progress_bar", "false"])
    report = cli.trainer.callbacks[[type(c).__name__ for c in cli.trainer.callbacks].index("RetrievalReport")]
    metrics = json.loads(Path(report.path).read_text())
    assert metrics["test/t2a/R@1"] >= 5 * CHANCE_T2A_R1, metrics
