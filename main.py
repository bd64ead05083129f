"""Command-line entry point: ``python main.py {fit,validate,test,predict} --config configs/<recipe>.yaml``.

``python main.py sweep --config <recipe> --sweep configs/sweeps/<name>.yaml`` runs an ablation grid
(see :mod:`lightning_modules.sweep`).

``python main.py search --queries <embeddings.safetensors> --corpus <embeddings.safetensors>`` ranks
the corpus for every query (see :mod:`lightning_modules.search`).

The packages are imported so that configs can name classes by their short name
(``class_path: QwenOmniThinker``, ``class_path: InfoNCE``, ...).
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import callbacks  # noqa: F401
import datamodules  # noqa: F401
import lightning_modules  # noqa: F401
import losses  # noqa: F401
from callbacks import EmbeddingWriter, HyperparameterSummary, RetrievalReport
from datamodules import RetrievalDataModule
from lightning_modules import EmbeddingModule, search
from lightning_modules.sweep import run_sweep


class EmbeddingCLI(LightningCLI):
    """LightningCLI with the project's always-on callbacks and an optional test after ``fit``."""

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
        parser.add_lightning_class_args(EmbeddingWriter, "writer")
        parser.add_lightning_class_args(HyperparameterSummary, "hparams")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, run the test split with the best checkpoint (the demo does).",
        )

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best")


def main(args: list[str] | None = None) -> EmbeddingCLI | list[dict[str, Any]]:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["sweep"]:
        return run_sweep(argv[1:])
    if argv[:1] == ["search"]:
        return search.main(argv[1:])
    return EmbeddingCLI(
        EmbeddingModule,
        RetrievalDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
