"""Every YAML in configs/ smoke-runs through the real CLI with ``--trainer.fast_dev_run``.

Recipes naming real checkpoints run with their tiny overlay ``configs/tiny/<name>.yaml``; overlays
(ablations, strategies) run on top of the demo recipe.
"""

from pathlib import Path

import pytest
import yaml

from main import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(p for p in CONFIGS.glob("*.yaml"))
OVERLAYS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent != CONFIGS and p.parent.name != "tiny")
if (CONFIGS / "sweeps").is_dir():
    OVERLAYS = [p for p in OVERLAYS if "sweeps" not in p.parts]


def config_args(recipe: Path) -> list[str]:
    args = ["--config", str(recipe)]
    tiny = CONFIGS / "tiny" / recipe.name
    if tiny.exists():
        args += ["--config", str(tiny)]
    return args


def smoke(args: list[str], tmp_path: Path) -> None:
    # conftest.py restores the environment and process group that strategy overlays leave behind
    main(["fit", *args, "--trainer.fast_dev_run", "2", "--trainer.default_root_dir", str(tmp_path),
          "--test_after_fit", "false", "--trainer.enable_progress_bar", "false"])


SMALL_DATA = ["--data.init_args.num_train", "16", "--data.init_args.num_val", "8", "--data.init_args.num_test", "8"]


def is_reranker(recipe: Path) -> bool:
    return (yaml.safe_load(recipe.read_text()).get("model") or {}).get("class_path") == "RerankModule"


@pytest.fixture(scope="module")
def embedding_run(tmp_path_factory) -> list[str]:
    """What a re-ranker recipe needs from stage 1: a demo embedding checkpoint and its mined negatives
    (two training steps, small synthetic data), as settings for the re-ranker's command line."""
    root = tmp_path_factory.mktemp("stage1")
    data = ["--data.init_args.root", str(root / "data"), *SMALL_DATA]
    batch = ["--data.init_args.batch_size", "4"]
    main(["fit", "--config", str(CONFIGS / "demo.yaml"), *data, *batch, "--trainer.max_steps", "2",
          "--trainer.default_root_dir", str(root / "runs"), "--test_after_fit", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"])
    ckpt = next((root / "runs").rglob("last.ckpt"))
    main(["mine", "--config", str(CONFIGS / "demo.yaml"), *data, "--ckpt_path", str(ckpt),
          "--output", str(root / "mined.jsonl"), "--threshold", "none", "--k", "4"])
    return [*data, "--model.init_args.embedding_ckpt", str(ckpt),
            "--data.init_args.mined_negatives", str(root / "mined.jsonl"), "--model.init_args.k", "3"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_smoke_runs(recipe, tmp_path, request):
    extra = request.getfixturevalue("embedding_run") if is_reranker(recipe) else []
    smoke(config_args(recipe) + extra, tmp_path)


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
