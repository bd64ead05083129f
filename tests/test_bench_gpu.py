"""benchmarks/bench_gpu.py parses its options everywhere, says why it measures nothing without CUDA,
its whole step (meta build, to_empty, QLoRA, checkpointing, FLOP count) runs at tiny shapes, a
failing row is reported in its place without losing the others, and memory that held NaN before
``to_empty`` does not reach the BatchNorm statistics."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

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


TINY = ["--tiny", "--pairs", "2", "--audio-seconds", "1", "--steps", "1", "--warmup", "0"]


def test_failing_row_is_reported_and_the_others_still_print(bench, capsys, monkeypatch):
    """The first row fails (as ``--attn flash_attention_2`` does without flash-attn); the table
    still gets its header, the failure in that row's place, and the next row's figures."""

    def broken(args, device):
        raise ImportError("flash_attn seems to be not installed")

    monkeypatch.setitem(bench.MODELS, "qwen-omni-7b", broken)
    status = bench.main([*TINY, "--qlora", "no", "--checkpointing", "no", "--models", "qwen-omni-7b", "midashenglm-7b"])
    out = capsys.readouterr()
    assert status == 1  # the run says something failed
    lines = out.out.splitlines()
    header = lines.index(bench.table_header().splitlines()[0])
    assert lines[header + 2] == "| qwen-omni-7b | no | no | failed: ImportError: flash_attn seems to be not installed |"
    assert lines[header + 3].startswith("| midashenglm-7b | no | no | ")
    assert len(lines[header + 3].split("|")) == len(bench.COLUMNS) + 2
    assert "Traceback" in out.err


def test_rows_print_as_they_finish(bench, capsys, monkeypatch):
    """The first row is on stdout before the second one starts."""
    seen = []
    original = bench.bench

    def spy(name, *rest):
        seen.append(capsys.readouterr().out)
        return original(name, *rest)

    monkeypatch.setattr(bench, "bench", spy)
    assert bench.main([*TINY, "--qlora", "no", "--models", "midashenglm-7b"]) == 0
    assert "| midashenglm-7b |" not in seen[0]
    assert "| midashenglm-7b | no | no |" in seen[1]


def poison_to_empty(monkeypatch):
    """Make ``to_empty`` hand out memory full of NaN, as a reused GPU allocation can be."""
    original = nn.Module.to_empty

    def to_empty(self, *, device, recurse=True):
        out = original(self, device=device, recurse=recurse)
        with torch.no_grad():
            for tensor in [*out.parameters(), *out.buffers()]:
                if tensor.is_floating_point():
                    tensor.fill_(float("nan"))
        return out

    monkeypatch.setattr(nn.Module, "to_empty", to_empty)


def test_batchnorm_statistics_are_reset_after_to_empty(bench, monkeypatch):
    poison_to_empty(monkeypatch)
    args = argparse.Namespace(tiny=True, attn="sdpa", pairs=2, audio_seconds=1.0, text_tokens=8)
    built = bench.build_midashenglm(args, torch.device("cpu"))
    norms = [m for m in built.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    for norm in norms:
        assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
        assert torch.equal(norm.running_var, torch.ones_like(norm.running_var))
    built.audio.eval()
    with torch.no_grad():
        states = built.forward(built.model, built.queries)
    assert torch.isfinite(states).all()
