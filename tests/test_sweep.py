"""``main.py sweep``: grid expansion, run names, dry run, and a real two-variant sweep on the demo."""

import csv
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from datamodules import RetrievalDataModule

from lightning_modules.tools.sweep import (
    MAIN,
    entry_args,
    error_headline,
    error_summary,
    finished_record,
    load_sweep,
    markdown_table,
    safe_name,
    summarise,
)
from main import main

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "configs" / "demo.yaml")


def write_sweep(path: Path, spec: dict) -> str:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


@pytest.fixture
def overlay(tmp_path):
    path = tmp_path / "mean.yaml"
    path.write_text("model:\n  pooler:\n    class_path: MeanPooler\n")
    return str(path)


def test_grid_is_the_product_of_the_axes_in_order(tmp_path, overlay):
    sweep = write_sweep(
        tmp_path / "s.yaml",
        {
            "base_args": ["trainer.max_epochs=2"],
            "axes": {
                "loss": {"infonce": [], "hybrid": ["model.loss=HybridNCE", "--model.loss.init_args.beta=0.2"]},
                "pool": {"emb": None, "mean": overlay},
            },
        },
    )
    base_args, variants = load_sweep(sweep)
    assert base_args == ["trainer.max_epochs=2"]
    assert [v.name for v in variants] == [
        "loss=infonce,pool=emb",
        "loss=infonce,pool=mean",
        "loss=hybrid,pool=emb",
        "loss=hybrid,pool=mean",
    ]
    last = variants[-1]
    assert last.values == {"loss": "hybrid", "pool": "mean"}
    assert last.entries == ["model.loss=HybridNCE", "--model.loss.init_args.beta=0.2", overlay]
    assert variants[0].settings() == "recipe"


def test_entries_become_cli_arguments(overlay):
    assert entry_args("model.loss.init_args.temperature=0.07") == ["--model.loss.init_args.temperature=0.07"]
    assert entry_args("--model.pooler=MeanPooler") == ["--model.pooler=MeanPooler"]
    assert entry_args('model.loss.init_args.masker={"class_path": "MarginMasker"}') == [
        '--model.loss.init_args.masker={"class_path": "MarginMasker"}'
    ]
    assert entry_args(overlay) == ["--config", overlay]


def test_run_names_are_filesystem_safe(tmp_path):
    assert safe_name("lr 1e-3/τ") == "lr-1e-3--"
    sweep = write_sweep(tmp_path / "s.yaml", {"axes": {"lr rate": {"1e-3 (fast)": ["model.learning_rate=1e-3"]}}})
    assert [v.name for v in load_sweep(sweep)[1]] == ["lr-rate=1e-3--fast-"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"axes": {}}, "'axes' must map"),
        ({"axes": {"a": {"x": []}}, "grid": 1}, "a sweep file has the keys"),
        ({"axes": {"a": []}}, "axis 'a' must map"),
        ({"axes": {"a": {"x": ["not a setting"]}}}, "neither a key=value setting nor a .yaml overlay"),
        ({"axes": {"a": {"x": ["configs/missing.yaml"]}}}, "does not exist"),
        ({"axes": {"a": {"x": [{"k": 1}]}}}, "expected a list"),
        ({"axes": {"a": {"x y": [], "x/y": []}}}, "collide"),
    ],
)
def test_bad_sweep_files_are_rejected(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        load_sweep(write_sweep(tmp_path / "s.yaml", spec))


def test_dry_run_prints_one_command_per_variant(tmp_path, overlay, capsys):
    sweep = write_sweep(
        tmp_path / "s.yaml",
        {"base_args": ["trainer.max_epochs=2"], "axes": {"pool": {"emb": [], "mean": [overlay]}}},
    )
    output = tmp_path / "out"
    assert main(["sweep", "--config", DEMO, "--sweep", sweep, "--output", str(output), "--dry_run",
                 "--trainer.max_steps", "3"]) == []
    lines = capsys.readouterr().out.splitlines()
    prefix = [sys.executable, str(MAIN), "fit", "--config", DEMO, "--trainer.max_epochs=2"]
    suffix = ["--trainer.max_steps", "3", "--trainer.default_root_dir"]
    assert [shlex.split(line) for line in lines] == [
        [*prefix, *suffix, str(output / "pool=emb")],
        [*prefix, "--config", overlay, *suffix, str(output / "pool=mean")],
    ]
    assert not output.exists()


def test_dry_run_with_seeds_runs_every_variant_once_per_seed(tmp_path, overlay, capsys):
    sweep = write_sweep(tmp_path / "s.yaml", {"axes": {"pool": {"emb": [], "mean": [overlay]}}})
    output = tmp_path / "out"
    main(["sweep", "--config", DEMO, "--sweep", sweep, "--output", str(output), "--dry_run", "--seeds", "3",
          "--trainer.max_steps", "3"])  # fmt: skip
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    prefix = [sys.executable, str(MAIN), "fit", "--config", DEMO]
    expected = []
    for name, entries in (("pool=emb", []), ("pool=mean", ["--config", overlay])):
        for seed in range(3):
            expected.append([*prefix, *entries, f"--seed_everything={seed}", "--trainer.max_steps", "3",
                             "--trainer.default_root_dir", str(output / name / f"seed={seed}")])  # fmt: skip
    assert commands == expected
    with pytest.raises(ValueError, match="--seeds must be >= 1"):
        main(["sweep", "--config", DEMO, "--sweep", sweep, "--dry_run", "--seeds", "0"])


def test_repository_sweeps_change_one_thing_per_axis():
    root = ROOT / "configs"
    _, variants = load_sweep(root / "sweeps" / "captions.yaml")
    assert [v.name for v in variants] == [
        "captions=caption,loss=infonce", "captions=caption,loss=hybrid_nce",
        "captions=multi_granular,loss=infonce", "captions=multi_granular,loss=hybrid_nce",
    ]  # fmt: skip
    # the loss overlays set only the loss, the caption overlay only the caption fields
    for overlay in sorted((root / "ablations" / "loss").glob("*.yaml")):
        assert "caption_fields" not in overlay.read_text(), overlay.name
    captions = yaml.safe_load((root / "ablations" / "captions" / "multi_granular.yaml").read_text())
    assert captions == {"data": {"init_args": {"caption_fields": ["caption", "caption_long", "caption_short", "tags"]}}}
    for sweep in sorted((root / "sweeps").glob("*.yaml")):
        load_sweep(sweep)  # every overlay it names exists


def _record(variant, seed, status, metrics, seconds=10.0):
    return {"variant": variant, "seed": seed, "values": {}, "settings": "s", "status": status, "seconds": seconds,
            "error": "" if status == "ok" else "exit code 1\nValueError: boom", "metrics": metrics}  # fmt: skip


def test_seed_aggregation_reports_mean_and_sample_std():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 50, 3), rng.uniform(0, 50, 2)
    records = [_record("v=a", i, "ok", {"test/t2a/R@1": float(x), "test/a2t/R@1": 1.0}) for i, x in enumerate(a)]
    records += [_record("v=b", i, "ok", {"test/t2a/R@1": float(x)}) for i, x in enumerate(b)]
    records.append(_record("v=b", 2, "failed", {}))
    summaries = summarise(records)
    assert [(s["variant"], s["runs"], s["finished"], s["seconds"]) for s in summaries] == [
        ("v=a", 3, 3, 30.0), ("v=b", 3, 2, 30.0)
    ]  # fmt: skip
    mean, std, count = summaries[0]["metrics"]["test/t2a/R@1"]
    assert (mean, std, count) == (pytest.approx(a.mean()), pytest.approx(a.std(ddof=1)), 3)
    assert summaries[0]["metrics"]["test/a2t/R@1"][1] == 0.0
    table = markdown_table(records, "### t")
    row_a = next(line for line in table.splitlines() if line.startswith("| `v=a`"))
    row_b = next(line for line in table.splitlines() if line.startswith("| `v=b`"))
    best, other = (row_a, row_b) if a.mean() > b.mean() else (row_b, row_a)
    assert f"**{a.mean() if best is row_a else b.mean():.2f} ± " in best and "**" not in other.split("|")[3]
    assert f"{a.mean():.2f} ± {a.std(ddof=1):.2f}" in row_a and "| ok 3/3 |" in row_a
    assert f"{b.mean():.2f} ± {b.std(ddof=1):.2f}" in row_b and "| partial 2/3 |" in row_b
    assert "- `v=b` seed=2: `exit code 1: ValueError: boom`" in table
    # one run per variant: plain values and statuses, as without seeds
    single = markdown_table([_record("v=a", None, "ok", {"test/t2a/R@1": 5.0})], "### t")
    assert "| **5.00** | ok | 10 |" in single


def test_only_an_ok_record_with_the_same_command_counts_as_finished(tmp_path):
    command = ["/usr/bin/python", "main.py", "fit", "--config", "a.yaml"]
    assert finished_record(tmp_path, command) is None
    record = {"status": "ok", "command": command}
    (tmp_path / "sweep_result.json").write_text(json.dumps(record))
    assert finished_record(tmp_path, command) == record
    # Another interpreter (e.g. a different virtualenv path) runs the same experiment.
    assert finished_record(tmp_path, ["/other/python", *command[1:]]) == record
    assert finished_record(tmp_path, [*command, "--trainer.max_epochs=3"]) is None
    (tmp_path / "sweep_result.json").write_text(json.dumps({**record, "status": "failed"}))
    assert finished_record(tmp_path, command) is None


def test_error_headline_keeps_the_exception_and_its_reasons():
    stderr = "Traceback (most recent call last):\n  File x\nValueError: no subtype\nErrors:\n  - temperature must be positive\n"
    assert error_headline(error_summary(1, stderr)) == (
        "exit code 1: ValueError: no subtype; Errors:; - temperature must be positive"
    )
    assert error_headline(error_summary(2, "usage: main.py\nmain.py: error: unknown key")) == (
        "exit code 2: main.py: error: unknown key"
    )
    assert error_headline(error_summary(-9, "")) == "killed by signal 9 (out of memory?)"


def test_sweep_records_ok_and_failed_variants_and_resumes(tmp_path, capsys):
    sweep = write_sweep(
        tmp_path / "s.yaml",
        {
            "base_args": [
                "trainer.max_epochs=1",
                "trainer.max_steps=2",
                "trainer.limit_train_batches=2",
                "trainer.limit_val_batches=1",
                "trainer.limit_test_batches=1",
                "trainer.enable_progress_bar=false",
            ],
            "axes": {"tau": {"ok": ["model.loss.init_args.temperature=0.1"],
                             "bad": ["model.loss.init_args.temperature=-1"]}},
        },
    )
    output = tmp_path / "out"
    args = ["sweep", "--config", DEMO, "--sweep", sweep, "--output", str(output)]
    records = main(args)

    assert [(r["variant"], r["status"]) for r in records] == [("tau=ok", "ok"), ("tau=bad", "failed")]
    ok, bad = records
    assert {"test/t2a/R@1", "test/a2t/R@1", "val/t2a/R@1", "best val/t2a/R@1"} <= set(ok["metrics"])
    assert "temperature must be positive" in bad["error"]
    with open(output / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["tau"], r["status"]) for r in rows] == [("tau=ok", "ok", "ok"), ("tau=bad", "bad", "failed")]
    assert float(rows[0]["test/t2a/R@1"]) == ok["metrics"]["test/t2a/R@1"]
    assert "temperature must be positive" in rows[1]["error"]
    table = (output / "results.md").read_text()
    assert "| `tau=ok` |" in table and "| failed |" in table and "temperature must be positive" in table
    assert (output / "results.png").read_bytes()[:4] == b"\x89PNG"

    # Re-run: the finished variant is skipped, the failed one is tried again.
    capsys.readouterr()
    ok_record = (output / "tau=ok" / "sweep_result.json").read_text()
    again = main(args)
    out = capsys.readouterr().out
    assert "tau=ok: finished earlier, skipped" in out
    assert "tau=bad: running" in out
    assert (output / "tau=ok" / "sweep_result.json").read_text() == ok_record
    assert [r["status"] for r in again] == ["ok", "failed"]
    assert again[0] == ok


def _demo_weights(tmp_path, seed_args):
    from lightning_modules import EmbeddingModule
    from main import EmbeddingCLI

    cli = EmbeddingCLI(EmbeddingModule, RetrievalDataModule, subclass_mode_data=True, run=False,
                       args=["--config", DEMO, "--data.init_args.root", str(tmp_path), *seed_args])  # fmt: skip
    return {name: p.detach().clone() for name, p in cli.model.named_parameters()}


def test_a_run_seed_changes_the_demo_model_and_a_pinned_tiny_seed_does_not(tmp_path):
    # sweep --seeds varies only --seed_everything: the demo's tiny model must follow it (its weights were
    # once pinned by the backbone's own seed, so every seed of a variant gave the same result)
    runs = [_demo_weights(tmp_path, [f"--seed_everything={s}"]) for s in (0, 0, 1)]
    assert runs[0].keys() == runs[2].keys()
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    matrices = [n for n, p in runs[0].items() if p.ndim >= 2]
    changed = [n for n in matrices if not torch.equal(runs[0][n], runs[2][n])]
    assert len(changed) == len(matrices), "every weight matrix of the tiny model depends on the run's seed"
    pinned = [_demo_weights(tmp_path, [f"--seed_everything={s}", "--model.backbone.init_args.seed=3"]) for s in (0, 1)]
    assert all(torch.equal(pinned[0][n], pinned[1][n]) for n in pinned[0])
    assert not torch.equal(pinned[0][changed[0]], runs[0][changed[0]])
