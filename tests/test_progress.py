"""Plain progress lines when stdout is a file: what a SLURM log or ``fit ... > run.log`` shows."""

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from callbacks.progress import LineProgress

ROOT = Path(__file__).resolve().parent.parent
TRAIN_LINE = re.compile(
    r"^epoch 1/\d+ batch (\d+)/4 \| step (\d+)/4 \| train/loss \d+\.?\d* \| \d+\.\d\d it/s"
    r" \| elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$"
)


def test_redirected_fit_log_has_progress_lines(tmp_path):
    log = tmp_path / "fit.log"
    command = [
        sys.executable, str(ROOT / "main.py"), "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
        "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0", "--test_after_fit", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"), "--progress.every_n_batches", "2",
        "--data.init_args.root", str(tmp_path / "data"), "--data.init_args.num_train", "16",
        "--data.init_args.num_val", "4", "--data.init_args.num_test", "4", "--data.init_args.num_hard_pairs", "0",
        "--data.init_args.batch_size", "4", "--data.init_args.train_max_seconds", "1",
    ]  # fmt: skip
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = log.read_text()
    assert "\r" not in text and "\x1b[" not in text  # no bar redraws or terminal escapes
    lines = text.splitlines()
    progress = [TRAIN_LINE.match(line) for line in lines]
    assert [(m[1], m[2]) for m in progress if m] == [("2", "2"), ("4", "4")], text
    summary = re.compile(r"training: 4 steps in \d+:\d\d:\d\d \| train/loss \d+\.?\d*")
    assert any(summary.fullmatch(line) for line in lines), text


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_replace_the_default_bar_only_off_a_terminal():
    auto = LineProgress()
    assert auto.replaces_default_bar({}, io.StringIO())
    assert not auto.replaces_default_bar({}, _Terminal())
    assert not auto.replaces_default_bar({"enable_progress_bar": False}, io.StringIO())
    assert not auto.replaces_default_bar({"callbacks": [LineProgress()]}, io.StringIO())
    assert LineProgress(style="lines").replaces_default_bar({}, _Terminal())
    assert not LineProgress(style="bar").replaces_default_bar({}, io.StringIO())
    with pytest.raises(ValueError, match="every_n_batches"):
        LineProgress(every_n_batches=0)
