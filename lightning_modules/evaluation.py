"""Evaluation over several named sets in one validation or test epoch.

The data module declares its evaluation sets (:meth:`RetrievalDataModule.eval_sets`), one loader
each; the module keeps one :class:`Evaluator` per set for the running epoch and routes every batch
to it by ``dataloader_idx``. Metric keys are ``<stage>/<set>/<metric>`` for named sets and
``<stage>/<metric>`` for the single unnamed set of ``val_manifest`` / ``test_manifest``, where
``<metric>`` is e.g. ``t2a/R@1``, ``s2t/mAP@10``, ``t2t/R@5``, ``hn/HNSR@1``, ``qa/accuracy``,
``qa/accuracy/<category>`` or ``diag/modality_gap``. With named sets, the mean of each ``t2a`` /
``a2t`` recall and mAP over the audio–text sets is logged as ``<stage>/t2a/R@1`` etc., so the
default checkpoint monitor ``val/t2a/R@1`` works whichever sets are configured.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from datamodules.eval_sets import DIRECTION_NAMES, EvalSet, HardNegative, qa_layout
from datamodules.inputs import EmbedInput
from lightning_modules.metrics import AudioTextRetrieval, QARetrievalAccuracy

__all__ = ["Evaluator", "build_evaluators", "mean_over_sets"]

#: metrics averaged over the named audio–text sets (ranks are not: their scale depends on set size).
AVERAGED = re.compile(r"^(t2a|a2t)/(R@\d+|mAP@\d+)$")


class Evaluator:
    """One evaluation set during an epoch: its metric, and how a batch and the extras feed it.

    Args:
        name: the set's name (``None`` for the unnamed shorthand set).
        spec: the set's definition.
        metric: :class:`AudioTextRetrieval` for the retrieval tasks, :class:`QARetrievalAccuracy` for ``qa``.
        hard_negatives: the set's hard-negative triples, if any.
        document_instruction: instruction the hard-negative query texts are embedded with (the
            captions' own).
    """

    def __init__(
        self,
        name: str | None,
        spec: EvalSet,
        metric: Metric,
        hard_negatives: list[HardNegative] | None = None,
        document_instruction: str | None = None,
    ):
        self.name = name
        self.spec = spec
        self.metric = metric
        self.hard_negatives = hard_negatives
        self.document_instruction = document_instruction

    def update(self, query: Tensor, document: Tensor, batch: dict[str, Any]) -> None:
        """Store one batch's query (audio side) and document (text side) embeddings."""
        common = (query, batch["query_index"], document, batch["document_index"], batch["document_key"])
        if self.spec.task == "qa":
            self.metric.update(*common, batch["answer_key"], batch["category_index"])
        else:
            self.metric.update(*common)

    def hard_negative_queries(self) -> list[EmbedInput] | None:
        """The hard-negative query texts to embed, or ``None`` without hard negatives."""
        if not self.hard_negatives:
            return None
        return [EmbedInput(text=t.query, instruction=self.document_instruction) for t in self.hard_negatives]

    def hard_negative_ids(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Clip indices (the audio ids of the metric) of each triple's target and negative."""
        target = torch.tensor([t.target for t in self.hard_negatives], dtype=torch.long, device=device)
        negative = torch.tensor([t.negative for t in self.hard_negatives], dtype=torch.long, device=device)
        return target, negative

    def compute(self, stage: str, hard_negatives: tuple[Tensor, Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """The set's metrics under ``<stage>[/<name>]/``; resets the metric."""
        if hard_negatives is not None:
            # Triples whose clips were not embedded (partial evaluation) are left out and counted
            # by hn/queries; ids unknown to the set were already refused when the file was read.
            values = self.metric.compute_with(hard_negatives, drop_missing=True)
        else:
            values = self.metric.compute()
        self.metric.reset()
        prefix = stage if self.name is None else f"{stage}/{self.name}"
        return {f"{prefix}/{key}": value for key, value in values.items()}


def build_evaluators(datamodule: Any, stage: str, device: torch.device) -> list[Evaluator]:
    """One evaluator per evaluation set of ``stage`` (``val`` or ``test``), in loader order.

    A data module without ``eval_sets`` (or none at all, when loaders are passed to the trainer
    directly) is scored as one unnamed audio–text set.
    """
    if datamodule is None or not hasattr(datamodule, "eval_sets"):
        return [Evaluator(None, EvalSet("<loader>"), AudioTextRetrieval().to(device))]
    evaluators = []
    for name, spec in datamodule.eval_sets(stage):
        if spec.task == "qa":
            categories = qa_layout(datamodule.set_records(stage, name), spec.category_field)[2]
            metric: Metric = QARetrievalAccuracy(category_names=categories)
        else:
            metric = AudioTextRetrieval(
                names=DIRECTION_NAMES[spec.task], text_text=spec.text_text, diagnostics=spec.diagnostics
            )
        hard_negatives = datamodule.hard_negatives(stage, name)
        instruction = getattr(datamodule, "document_instruction", None)
        evaluators.append(Evaluator(name, spec, metric.to(device), hard_negatives, instruction))
    return evaluators


def mean_over_sets(values: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
    """``<stage>/<metric>``: the mean over named sets of each recall / mAP in :data:`AVERAGED`."""
    groups: dict[str, list[Tensor]] = {}
    for key, value in values.items():
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[0] == stage and AVERAGED.match(parts[2]):
            groups.setdefault(f"{stage}/{parts[2]}", []).append(value)
    return {key: torch.stack(group).mean() for key, group in groups.items() if key not in values}
