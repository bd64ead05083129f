"""The README's re-ranking commands, in order, as subprocesses: demo fit → mine → re-ranker fit (which
tests the best checkpoint); the fused test T2A R@1 must beat the embedding model's alone.

Marked ``demo`` (``python -m pytest -m demo``): it trains both demo models in full (tens of minutes on
two CPU cores) and is outside the CI selection until a run has confirmed its assertion."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, f"{args[:3]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


@pytest.mark.demo
def test_readme_rerank_commands_beat_the_embedding_model(tmp_path):
    configs = REPO / "configs"
    data = ["--data.init_args.root", str(tmp_path / "synthetic")]
    progress = ["--trainer.enable_progress_bar", "false"]
    run("fit", "--config", str(configs / "demo.yaml"), *data, *progress,
        "--trainer.default_root_dir", "runs/demo", "--test_after_fit", "false", cwd=tmp_path)
    ckpt = next((tmp_path / "runs/demo").rglob("last.ckpt"))
    run("mine", "--config", str(configs / "demo.yaml"), *data, "--ckpt_path", str(ckpt),
        "--output", "runs/demo/mined.jsonl", "--threshold", "none", cwd=tmp_path)
    run("fit", "--config", str(configs / "demo_rerank.yaml"), *data, *progress,
        "--trainer.default_root_dir", "runs/demo_rerank", "--model.init_args.embedding_ckpt", str(ckpt),
        "--data.init_args.mined_negatives", "runs/demo/mined.jsonl", cwd=tmp_path)
    report = next((tmp_path / "runs/demo_rerank").rglob("test_metrics.json"))
    metrics = json.loads(report.read_text())
    print(json.dumps({k: v for k, v in metrics.items() if "R@1" in k or "alpha" in k}, indent=1))
    assert metrics["test/rerank/t2a/R@1"] > metrics["test/t2a/R@1"]
    assert (report.parent / "test_metrics_alpha.png").is_file()
