"""benchmarks/gpu_session.sh, the first-run script for a CUDA machine, in its CPU dry-run mode: a
failing step does not stop the later ones, every step gets its own log, the re-ranker step waits for
its benchmark, and a summary with the device, the date and each step's status is appended to the
results file. The full dry run (every step, the Lightning fits included) is slow."""

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_session.sh"
RERANK_EXISTS = (REPO / "benchmarks" / "bench_rerank.py").is_file()


def dry_run(tmp_path: Path, python: str = sys.executable, steps: str = "") -> tuple[subprocess.CompletedProcess, Path]:
    out, results = tmp_path / "out", tmp_path / "results.md"
    results.write_text("# Benchmark results\n")
    env = {**os.environ, "ACC": "cpu", "SKIP_PIP": "1", "OUT": str(out), "RUNS": str(tmp_path / "runs"),
           "RESULTS": str(results), "PY": python, "STEPS": steps, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800)
    return done, out


def statuses(out: Path) -> dict[str, str]:
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    return {row[0]: row[1] for row in rows}


def test_a_failing_step_does_not_stop_the_later_ones(tmp_path):
    """The first step's Python (the one importing bitsandbytes) fails with status 3; the 7B benchmark
    after it still runs (without CUDA it says that nothing was measured), and the summary records
    both."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\ncase "$2" in *bitsandbytes*) exit 3 ;; esac\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    done, out = dry_run(tmp_path, str(python), steps="01_env 03_bench_7b 09_bench_rerank")
    assert done.returncode == 0, done.stderr
    assert "== 01_env rc=3" in done.stdout and "== 03_bench_7b rc=0" in done.stdout
    assert "no CUDA device" in (out / "03_bench_7b.log").read_text()
    expected = {"01_env": "3", "03_bench_7b": "0", "09_bench_rerank": "0" if RERANK_EXISTS else "skipped"}
    assert statuses(out) == expected  # only the selected steps ran
    results = (tmp_path / "results.md").read_text()
    assert results.startswith("# Benchmark results\n")  # appended, not overwritten
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    assert f"## First-run session (`benchmarks/gpu_session.sh`): CPU, {today}" in results
    assert "| 01_env | 3 |" in results and "| 03_bench_7b | 0 |" in results
    if not RERANK_EXISTS:
        assert "| 09_bench_rerank | skipped (benchmarks/bench_rerank.py does not exist yet) |" in results
    assert results.endswith((out / "summary.md").read_text())


@pytest.mark.slow
def test_full_dry_run_passes_every_step(tmp_path):
    """Every command line of the session at the smallest sizes on CPU: the benchmarks, the fits (the
    resume step restores the GradCache fit's last checkpoint), the tests."""
    done, out = dry_run(tmp_path)
    assert done.returncode == 0, done.stderr
    status = statuses(out)
    assert list(status) == ["01_env", "02_bench_tiny", "03_bench_7b", "04_fit_gradcache", "05_resume", "06_qlora",
                            "07_fsdp2", "08_aurola", "09_bench_rerank", "10_pytest_gpu"]
    failed = {name: rc for name, rc in status.items() if rc not in ("0", "skipped")}
    assert not failed, {name: (out / f"{name}.log").read_text()[-3000:] for name in failed}
    assert "Restored all states from the checkpoint" in (out / "05_resume.log").read_text()
    assert "| qwen-omni-7b | yes | yes |" in (out / "02_bench_tiny.log").read_text()
