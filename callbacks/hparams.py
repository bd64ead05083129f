"""Records each run's hyper-parameters with its final metrics for TensorBoard's HPARAMS tab."""

from __future__ import annotations

import json
import math
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

#: the evaluation stages whose metrics are reported; each is declared under every stage's name.
STAGES = ("val", "test")


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flat ``{"model.loss.temperature": 0.05, "model.loss": "losses.infonce.InfoNCE", ...}``.

    ``class_path`` becomes the value of its component's own key and ``init_args`` levels are
    dropped, so keys read like the command-line options. Lists become JSON strings (TensorBoard
    takes numbers, strings and booleans only).
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = prefix if key == "init_args" else f"{prefix}.{key}" if prefix else key
        if key == "class_path":
            flat[prefix] = value
        elif isinstance(value, dict):
            flat.update(flatten_config(value, name))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value, default=str)
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class HyperparameterSummary(Callback):
    """Writes the run's hyper-parameters and final metrics with ``TensorBoardLogger.log_hyperparams``.

    Hyper-parameters: the LightningCLI config of the run, flattened (``model.loss``,
    ``model.loss.temperature``, ``model.backbone.lora.r``, ``model.learning_rate``,
    ``data.batch_size``, ``trainer.max_steps``, ...; only the list of ``--config`` files is left
    out). Outside the CLI: the module's and data module's saved hyper-parameters and the class
    of each model component.

    Metrics: ``final/val/...`` (the last validation of ``fit``, or ``validate``) and
    ``final/test/...`` (``test``), e.g. ``final/test/t2a/R@1``.

    TensorBoard keeps the *first* hyper-parameter summary of a run directory and takes the
    metric columns of the comparison from one run's summary. So this callback (a) stops
    Lightning's automatic summary (its ``hp_metric`` placeholder; ``hparams.yaml`` is still
    written) and (b) writes its summary once per run, at the end of the first stage, declaring
    the metrics of every evaluation stage: the stages not run yet are NaN until a later stage
    of the same run (``test`` after ``fit``) logs their values, which TensorBoard then shows
    (it reads each metric's last value). Runs thus share the same columns.

    Loggers other than TensorBoard, and runs without a logger, are left alone.
    """

    prefix = "final"

    def __init__(self) -> None:
        self._written: set[str] = set()
        self._final: dict[str, float] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in self._loggers(trainer):
            # Without metrics and with this off, Lightning's own log_hyperparams only updates
            # hparams.yaml and writes no summary that would shadow ours.
            logger._default_hp_metric = False

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._record(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record(trainer, pl_module)

    @staticmethod
    def _loggers(trainer: Trainer) -> list[TensorBoardLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def _record(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loggers = self._loggers(trainer)
        if not loggers:
            return
        for key, value in trainer.callback_metrics.items():
            stage = key.split("/", 1)[0]
            if stage in STAGES:
                self._final[f"{self.prefix}/{key}"] = float(value)
        names = {name.split("/", 2)[2] for name in self._final}
        declared = {f"{self.prefix}/{stage}/{name}": math.nan for stage in STAGES for name in sorted(names)}
        metrics = {**declared, **self._final}
        for logger in loggers:
            if logger.log_dir in self._written:
                logger.log_metrics(self._final, step=trainer.global_step)
            else:
                logger.log_hyperparams(self._params(trainer, pl_module), metrics, step=trainer.global_step)
                self._written.add(logger.log_dir)

    @staticmethod
    def _params(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        for callback in trainer.callbacks:
            if isinstance(callback, SaveConfigCallback):
                config = callback.config.as_dict()
                config.pop("config", None)
                return flatten_config(config)
        params = dict(pl_module.hparams_initial)
        if trainer.datamodule is not None:
            params.update(trainer.datamodule.hparams_initial)
        for name in ("backbone", "pooler", "head", "loss"):
            part = getattr(pl_module, name, None)
            if part is not None:
                params[name] = f"{type(part).__module__}.{type(part).__qualname__}"
        return flatten_config(params)
