"""Command-line entry point: ``python main.py {fit,validate,test,predict} --config configs/<recipe>.yaml``.

``python main.py sweep --config <recipe> --sweep configs/sweeps/<name>.yaml`` runs an ablation grid
(see :mod:`lightning_modules.sweep`).

``python main.py search --queries <embeddings.safetensors> --corpus <embeddings.safetensors>`` ranks
the corpus for every query (see :mod:`lightning_modules.search`).

``python main.py check-data --config configs/<recipe>.yaml`` scans the data section's manifests and
audio headers and reports every bad row or file, without building the model (see
:mod:`datamodules.check`).

The packages are imported so that configs can name classes by their short name
(``class_path: QwenOmniThinker``, ``class_path: InfoNCE``, ...).
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

import callbacks  # noqa: F401
import datamodules  # noqa: F401
import lightning_modules  # noqa: F401
import losses  # noqa: F401
from callbacks import EmbeddingProjector, EmbeddingWriter, HyperparameterSummary, RetrievalReport, SkippedSampleReport
from callbacks.output_dirs import check_output_dirs
from callbacks.preemption import PreemptionCheckpoint
from datamodules import RetrievalDataModule, check
from lightning_modules import EmbeddingModule, search
from lightning_modules.sweep import run_sweep


class EmbeddingCLI(LightningCLI):
    """LightningCLI with the project's always-on callbacks (checkpoints, preemption, reports), a check
    of the output folders before ``fit`` and an optional test after it."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/t2a/R@1",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch}-{step}",
            }
        )
        parser.add_lightning_class_args(RetrievalReport, "report")
        parser.add_lightning_class_args(EmbeddingProjector, "projector")
        parser.add_lightning_class_args(EmbeddingWriter, "writer")
        parser.add_lightning_class_args(HyperparameterSummary, "hparams")
        parser.add_lightning_class_args(SkippedSampleReport, "skipped_report")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, run the test split with the best checkpoint (the demo does).",
        )
        parser.add_argument(
            "--min_free_gb",
            type=float,
            default=2.0,
            help="Before fit, the log and checkpoint folders must be writable and have this many GB free "
            "plus the estimated size of one checkpoint (trainable weights and AdamW moments); else fit stops.",
        )

    def before_fit(self) -> None:
        # Only the first process: the others would race it for the logger's next version folder.
        if rank_zero_only.rank == 0:
            check_output_dirs(self.trainer, self.model, self.config[self.subcommand]["min_free_gb"])

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best")


def main(args: list[str] | None = None) -> EmbeddingCLI | list[dict[str, Any]]:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["sweep"]:
        return run_sweep(argv[1:])
    if argv[:1] == ["search"]:
        return search.main(argv[1:])
    if argv[:1] == ["check-data"]:
        raise SystemExit(check.main(argv[1:]))
    return EmbeddingCLI(
        EmbeddingModule,
        RetrievalDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
