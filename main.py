"""Command-line entry point: ``python main.py {fit,validate,test,predict} --config configs/<recipe>.yaml``.

The other subcommands (``sweep``, ``search``, ``export``, ``check-data``, ...) are the tools of
:mod:`lightning_modules.tools`, listed by ``python main.py --help``; each has its own ``--help``.

The packages are imported so that configs can name classes by their short name
(``class_path: QwenOmniThinker``, ``class_path: InfoNCE``, ...).
"""

from __future__ import annotations

import sys
from argparse import RawDescriptionHelpFormatter
from typing import Any

from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only
import yaml

import callbacks  # noqa: F401
import datamodules  # noqa: F401
import lightning_modules  # noqa: F401
import losses  # noqa: F401
from callbacks import (
    EmbeddingProjector,
    EmbeddingWriter,
    HyperparameterSummary,
    NonFiniteGuard,
    RetrievalReport,
    RngStateCheckpoint,
    SkippedSampleReport,
)
from callbacks.output_dirs import check_output_dirs
from callbacks.preemption import PreemptionCheckpoint
from callbacks.progress import LineProgress
from datamodules import RetrievalDataModule
from lightning_modules import EmbeddingModule
from lightning_modules.finetune import FineTuneModule
from lightning_modules.tools import TOOLS, tools_help


class EmbeddingCLI(LightningCLI):
    """LightningCLI with the project's always-on callbacks (checkpoints, preemption, non-finite guard,
    RNG state in checkpoints, reports), plain progress lines when stdout is not a terminal, the model's
    rate and collator bound to the data module, a check of the output folders before ``fit`` and an
    optional test after it."""

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
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_lightning_class_args(RngStateCheckpoint, "rng_state")
        # Not a callback group: whether the bar replaces Lightning's is decided in instantiate_trainer.
        parser.add_class_arguments(LineProgress, "progress")
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

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # The data decides nothing about the model: it gets the model's rate and collator here.
        if self.datamodule is not None:
            self.datamodule.bind(self.model.backbone.sampling_rate, self.model.collate)
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Plain progress lines instead of the terminal bar when stdout is a file (--progress.style).
        progress = self._get(self.config_init, "progress")
        trainer_config = self._get(self.config_init, "trainer", default={})
        if progress.replaces_default_bar(trainer_config):
            kwargs["callbacks"] = progress.with_trainer_callbacks(trainer_config)
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        # Only the first process: the others would race it for the logger's next version folder.
        if rank_zero_only.rank == 0:
            check_output_dirs(self.trainer, self.model, self.config[self.subcommand]["min_free_gb"])

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best")


def names_a_model_class(argv: list[str]) -> bool:
    """Whether a ``--config`` file gives ``model.class_path`` (e.g. ``RerankModule``): such configs pick
    their model among the project's :class:`FineTuneModule` subclasses; the others configure an
    :class:`EmbeddingModule` directly."""
    paths = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("--config", "-c")]
    paths += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                model = (yaml.safe_load(handle) or {}).get("model")
        except OSError:
            continue  # LightningCLI reports the missing file itself
        if isinstance(model, dict) and "class_path" in model:
            return True
    return False


def main(args: list[str] | None = None) -> EmbeddingCLI | list[dict[str, Any]]:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] and argv[0] in TOOLS:
        result = TOOLS[argv[0]].entry()(argv[1:])
        if isinstance(result, int) and not isinstance(result, bool):  # an exit status
            raise SystemExit(result)
        return result
    subclass = names_a_model_class(argv)
    return EmbeddingCLI(
        FineTuneModule if subclass else EmbeddingModule,
        RetrievalDataModule,
        subclass_mode_model=subclass,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"epilog": tools_help(), "formatter_class": RawDescriptionHelpFormatter},
        args=args,
    )


if __name__ == "__main__":
    main()
