"""benchmarks/bench_gpu.py parses its options everywhere, says why it measures nothing without CUDA,
and its whole step (meta build, to_empty, QLoRA, checkpointing, FLOP count) runs at tiny shapes."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_help(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    assert "--peak-tflops" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_without_cuda_says_nothing_was_measured(bench, capsys):
    assert bench.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_tiny_step_runs(bench, capsys):
    assert bench.main(["--tiny", "--qlora", "yes", "--checkpointing", "yes", "--pairs", "2", "--audio-seconds", "1",
                       "--steps", "1", "--warmup", "0"]) == 0
    table = capsys.readouterr().out
    assert "| midashenglm-7b | yes | yes |" in table and "| qwen-omni-7b | yes | yes |" in table
