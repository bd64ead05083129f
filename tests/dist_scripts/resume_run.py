"""Short ``main.py fit`` runs of tiny setups on synthetic data, in their own process, for
tests/test_resume.py and tests/test_preemption.py.

    python tests/dist_scripts/resume_run.py OUT VARIANT [--wait-at STEP] [--ckpt_path CKPT] [main.py options]

2 epochs × 4 steps (32 training clips, batches of 8), a step checkpoint after every step (from the
first validation on, unless ``--checkpoint.monitor null``: Lightning waits for the monitored
metric), and the CLI's always-on callbacks (preemption included). At the end of training the trainable weights go
to ``OUT/weights.pt``. ``--wait-at STEP`` writes ``OUT/waiting`` when step STEP begins (its
predecessor's checkpoint is on disk) and then waits until a preemption signal has been noted, or
60 s, so that the test can kill or signal the process there. Variants:

- ``plain``: the tiny ALM2Vec setup (MiDashengLM with LoRA dropout, learnable τ), ``max_steps``,
  automatic optimisation, no data-loader workers;
- ``grad_cache``: the same with GradCache (chunks of 4), 2 persistent workers, duration bucketing;
- ``demo``: ``configs/demo.yaml`` (tiny Qwen2.5-Omni thinker, ``SyntheticDataModule``) with
  ``max_epochs``, which makes Lightning build the train loader before it restores a checkpoint;
- ``jsonl``: the demo model with ``max_epochs`` on ``RetrievalDataModule`` reading the synthetic
  data's JSONL manifests, 2 persistent workers, duration bucketing.
- ``shards``: the same on ``WebDatasetDataModule`` reading the training manifest written as 7
  WebDataset shards of at most 5 clips (``python main.py shard``), a shuffle buffer of 4.

Every run also writes the clip ids of each trained batch, one JSON line per step and process, to
``OUT/batches.jsonl``. Under torchrun (``--trainer.devices 2 --trainer.strategy ddp``) the script
runs one process per rank, and rank 0 saves the weights.

The helpers below start the script (``run``), wait for it and compute, once per test session, the
weights of the uninterrupted run the tests compare with (``reference_weights``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
STEPS = 8
_ALM2VEC = ["alm2vec.yaml", "tiny/alm2vec.yaml"]
_WORKERS_AND_BUCKETS = ["--data.init_args.num_workers", "2", "--data.init_args.bucket_by_duration", "true"]
VARIANTS = {
    "plain": (_ALM2VEC, ["--model.grad_cache_chunk_size", "null"]),
    "grad_cache": (_ALM2VEC, ["--model.grad_cache_chunk_size", "4", *_WORKERS_AND_BUCKETS]),
    "demo": (["demo.yaml"], []),
    "jsonl": (["demo.yaml"], _WORKERS_AND_BUCKETS),
    "shards": (["demo.yaml"], [*_WORKERS_AND_BUCKETS, "--data.init_args.shuffle_buffer", "4",
                               "--data.init_args.bucket_pool_multiplier", "2"]),
}  # fmt: skip


def jsonl_manifests(data_root: Path) -> dict[str, str]:
    """The synthetic data of the runs (made on first use), as JSONL manifests."""
    from datamodules.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(str(data_root), num_train=32, num_val=8, num_test=8)


def shard_pattern(data_root: Path) -> str:
    """The training manifest of :func:`jsonl_manifests` as shards of at most 5 clips (made on first use)."""
    folder = data_root / "shards"
    if not (folder / "index.json").exists():
        from datamodules.shard_writer import main as shard

        shard(["--manifest", jsonl_manifests(data_root)["train"], "--output_dir", str(folder), "--max_count", "5"])
    return str(folder / json.loads((folder / "index.json").read_text())["pattern"])


def cli_args(out: Path, variant: str, data_root: Path) -> list[str]:
    configs, options = VARIANTS[variant]
    args = ["fit"]
    for config in configs:
        args += ["--config", str(REPO / "configs" / config)]
    if variant == "jsonl":
        manifests = jsonl_manifests(data_root)
        args += ["--data", "RetrievalDataModule", "--data.init_args.train_manifest", manifests["train"],
                 "--data.init_args.val_manifest", manifests["val"]]
    elif variant == "shards":
        args += ["--data", "WebDatasetDataModule", "--data.init_args.train_shards", shard_pattern(data_root),
                 "--data.init_args.val_manifest", jsonl_manifests(data_root)["val"]]
    else:
        args += ["--data.init_args.root", str(data_root), "--data.init_args.num_train", "32",
                 "--data.init_args.num_val", "8", "--data.init_args.num_test", "8"]
    args += [
        "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
        "--trainer.log_every_n_steps", "1", "--data.init_args.batch_size", "8",
        "--data.init_args.duration_cache_dir", str(data_root / "durations"),
        "--checkpoint.every_n_train_steps", "1", "--min_free_gb", "0",
    ]
    if configs == _ALM2VEC:
        args += ["--trainer.max_steps", str(STEPS), "--model.backbone.init_args.lora.dropout", "0.1"]
    else:
        args += ["--trainer.max_epochs", str(STEPS // 4), "--test_after_fit", "false"]
    return args + options  # fmt: skip


def run(out: Path, variant: str, data_root: Path, *extra: str) -> subprocess.Popen:
    """Start the script (extra: ``--wait-at``, ``--ckpt_path``, main.py options); stdout and stderr go
    to ``OUT/log.txt``."""
    out.mkdir(parents=True, exist_ok=True)
    # Not a SLURM job, whatever the test runner is: Lightning would requeue it on SIGUSR1.
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with open(out / "log.txt", "w") as log:
        return subprocess.Popen([sys.executable, __file__, str(out), variant, "--data-root", str(data_root), *extra],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def finish(process: subprocess.Popen, out: Path, timeout: float = 300) -> int:
    """Wait for the process; its exit status (raises with the log if it ran past ``timeout``)."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise RuntimeError(f"run in {out} hung:\n{log_of(out)}") from None


def log_of(out: Path) -> str:
    return (out / "log.txt").read_text()[-6000:]


def wait_until_waiting(process: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    """Return once the run announces its ``--wait-at`` step (raise if it ends or hangs first)."""
    deadline = time.monotonic() + timeout
    while not (out / "waiting").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"run in {out} never reached its wait step:\n{log_of(out)}")
        time.sleep(0.05)


def last_checkpoint(out: Path) -> Path:
    return out / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


_references: dict[tuple[str, ...], Path] = {}


def reference_run(tmp_path_factory, variant: str, *options: str) -> Path:
    """The output folder of an uninterrupted run, made once per test session."""
    key = (variant, *options)
    if key not in _references:
        out = tmp_path_factory.mktemp(f"reference_{variant}")
        status = finish(run(out, variant, data_root(tmp_path_factory), *options), out)
        assert status == 0, log_of(out)
        _references[key] = out
    return _references[key]


def batches_of(out: Path, rank: int = 0) -> list[dict]:
    """``{"rank", "step", "clip_ids"}`` of every batch the process of ``rank`` trained, in order."""
    path = out / "batches.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [row for row in map(json.loads, lines) if row["rank"] == rank]


def reference_weights(tmp_path_factory, variant: str, *options: str) -> dict[str, torch.Tensor]:
    """Final trainable weights of the uninterrupted run."""
    return torch.load(reference_run(tmp_path_factory, variant, *options) / "weights.pt")


def data_root(tmp_path_factory) -> Path:
    """The synthetic data folder the runs of a test session share."""
    return tmp_path_factory.getbasetemp() / "resume_data"


def main() -> None:
    from lightning import Callback

    sys.path.insert(0, str(REPO))
    from callbacks import PreemptionCheckpoint
    from datamodules import RetrievalDataModule
    from lightning_modules import EmbeddingModule
    from lightning_modules.weights import trainable_state_dict
    from main import EmbeddingCLI

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--wait-at", type=int)
    parser.add_argument("--ckpt_path")
    args, more = parser.parse_known_args()
    torch.set_num_threads(1)  # the same arithmetic in every run; a small CPU machine is shared

    class WaitAt(Callback):
        """Announces step ``args.wait_at`` and holds the process there (see the module docstring)."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step != args.wait_at:
                return
            (args.out / "waiting").write_text(str(os.getpid()))
            preemption = next(c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint))
            deadline = time.monotonic() + 60
            while not preemption.requested and time.monotonic() < deadline:
                time.sleep(0.05)

    class SaveWeights(Callback):
        def on_train_end(self, trainer, pl_module) -> None:
            if trainer.is_global_zero:
                torch.save(trainable_state_dict(pl_module), args.out / "weights.pt")

    class RecordBatches(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            row = {"rank": trainer.global_rank, "step": trainer.global_step, "clip_ids": batch.get("clip_ids")}
            with open(args.out / "batches.jsonl", "a") as handle:  # one short line per write: no interleaving
                handle.write(json.dumps(row) + "\n")

    sys.argv = sys.argv[:1]  # the options go to the CLI through args=
    callbacks = [SaveWeights(), RecordBatches()] + ([WaitAt()] if args.wait_at is not None else [])
    cli_options = cli_args(args.out, args.variant, args.data_root) + more
    if args.ckpt_path:
        cli_options += ["--ckpt_path", args.ckpt_path]
    EmbeddingCLI(EmbeddingModule, RetrievalDataModule, subclass_mode_data=True, save_config_kwargs={"overwrite": True},
                 trainer_defaults={"callbacks": callbacks}, args=cli_options)


if __name__ == "__main__":
    main()
