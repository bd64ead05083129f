"""Every YAML in configs/ smoke-runs through the real CLI with ``--trainer.fast_dev_run``.

Recipes naming real checkpoints run with their tiny overlay ``configs/tiny/<name>.yaml``; overlays
(ablations, strategies) run on top of the demo recipe.
"""

from pathlib import Path

import pytest

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


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_smoke_runs(recipe, tmp_path):
    smoke(config_args(recipe), tmp_path)


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
