"""Evaluation over several named sets in one validation or test epoch.

The data module declares its evaluation sets (:meth:`RetrievalDataModule.eval_sets`), one loader
each; the module keeps one :class:`Evaluator` per set for the running epoch and routes every batch
to it by ``dataloader_idx``. Metric keys are ``<stage>/<set>/<metric>`` for named sets and
``<stage>/<metric>`` for the single unnamed set of ``val_manifest`` / ``test_manifest``, where
``<metric>`` is e.g. ``t2a/R@1``, ``t2a/<query type>/R@1``, ``s2t/mAP@10``, ``t2t/R@5``,
``hn/HNSR@1``, ``qa/accuracy``, ``qa/accuracy/<category>``, ``zs/top1``, ``zs/mAP`` or
``diag/modality_gap``, next to the set's sizes (``n_audios``, ``n_texts``, ``n_queries``) and the
chance level of every recall and accuracy (``chance/t2a/R@1``, ...). With named sets, the mean of
each ``t2a`` / ``a2t`` recall and mAP (and of its chance level) over the audio–text sets is logged as
``<stage>/t2a/R@1`` etc., so the default checkpoint monitor ``val/t2a/R@1`` works whichever sets
are configured.

Some sets need texts that are not in any batch: the hard-negative queries, the class prompts of a
classification set. An evaluator lists them (:meth:`Evaluator.extra_texts`); the module embeds them
at the end of the epoch, on every process alike, and hands the embeddings to
:meth:`Evaluator.compute`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from datamodules.eval_sets import DIRECTION_NAMES, METRIC_GROUPS, ClassificationLayout, EvalSet, HardNegative, qa_layout
from datamodules.collate import MAX_DOCS_PER_CLIP
from datamodules.inputs import EmbedInput
from lightning_modules.metrics import AudioTextRetrieval, QARetrievalAccuracy, ZeroShotClassification

__all__ = ["Evaluator", "build_evaluators", "mean_over_sets"]

#: metrics averaged over the named audio–text sets (ranks are not: their scale depends on set size).
AVERAGED = re.compile(r"^(chance/)?(t2a|a2t)/(R@\d+|mAP@\d+)$")


class Evaluator:
    """One evaluation set during an epoch: its metric, and how a batch and the extra texts feed it.

    Args:
        name: the set's name (``None`` for the unnamed shorthand set).
        spec: the set's definition.
        metric: :class:`AudioTextRetrieval` for the retrieval tasks, :class:`QARetrievalAccuracy` for
            ``qa``, :class:`ZeroShotClassification` for ``classification``.
        hard_negatives: the set's hard-negative triples, if any.
        document_instruction: instruction the extra texts are embedded with (the captions' own).
        classes: the classes and labels of a classification set.
        query_types: per clip the query type of each text, and the type names (retrieval sets whose
            rows carry ``query_type``).
    """

    def __init__(
        self,
        name: str | None,
        spec: EvalSet,
        metric: Metric,
        hard_negatives: list[HardNegative] | None = None,
        document_instruction: str | None = None,
        classes: ClassificationLayout | None = None,
        query_types: tuple[list[list[int]], list[str]] | None = None,
    ):
        self.name = name
        self.spec = spec
        self.metric = metric
        self.hard_negatives = hard_negatives
        self.document_instruction = document_instruction
        self.classes = classes
        device = metric.device
        self._targets = self._text_types = None
        if classes is not None:  # (clips, classes) multi-hot labels, indexed by a batch's clip indices
            self._targets = torch.zeros(len(classes.targets), len(classes.classes), dtype=torch.bool, device=device)
            for clip, labels in enumerate(classes.targets):
                self._targets[clip, labels] = True
        if query_types is not None:  # (clips, texts) type index, indexed by a batch's document keys
            per_clip = query_types[0]
            self._text_types = torch.full((len(per_clip), max(map(len, per_clip))), -1, dtype=torch.long, device=device)
            for clip, types in enumerate(per_clip):
                self._text_types[clip, : len(types)] = torch.tensor(types, dtype=torch.long)

    def update(self, query: Tensor, document: Tensor | None, batch: dict[str, Any]) -> None:
        """Store one batch's query (audio side) and document (text side) embeddings."""
        if self.spec.task == "classification":
            clips = batch["query_index"]
            self.metric.update(query, clips, self._targets[clips.to(self._targets.device)])
            return
        common = (query, batch["query_index"], document, batch["document_index"], batch["document_key"])
        if self.spec.task == "qa":
            self.metric.update(*common, batch["answer_key"], batch["category_index"])
        elif self._text_types is not None:
            key = batch["document_key"].to(self._text_types.device)
            self.metric.update(*common, self._text_types[key // MAX_DOCS_PER_CLIP, key % MAX_DOCS_PER_CLIP])
        else:
            self.metric.update(*common)

    def extra_texts(self) -> list[EmbedInput] | None:
        """Texts to embed on the document side at the end of the epoch: the hard-negative queries
        or the class prompts (``len(classes) * len(templates)``, class by class); else ``None``."""
        if self.classes is not None:
            texts = self.classes.prompts(self.spec.templates)
        elif self.hard_negatives:
            texts = [triple.query for triple in self.hard_negatives]
        else:
            return None
        return [EmbedInput(text=text, instruction=self.document_instruction) for text in texts]

    def _hard_negative_ids(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Clip indices (the audio ids of the metric) of each triple's target and negative."""
        target = torch.tensor([t.target for t in self.hard_negatives], dtype=torch.long, device=device)
        negative = torch.tensor([t.negative for t in self.hard_negatives], dtype=torch.long, device=device)
        return target, negative

    def compute(self, stage: str, extra: Tensor | None = None) -> dict[str, Tensor]:
        """The set's metrics under ``<stage>[/<name>]/``, given the embeddings of :meth:`extra_texts`
        (in its order); resets the metric."""
        if self.classes is not None:
            # CLAP's prompt ensemble: mean of each class's normalised prompt embeddings, renormalised.
            per_class = extra.view(len(self.classes.classes), len(self.spec.templates), -1)
            values = self.metric.compute_with(F.normalize(per_class.mean(1), dim=-1))
        elif extra is not None:
            # Triples whose clips were not embedded (partial evaluation) are left out and counted
            # by n_queries; ids unknown to the set were already refused when the file was read.
            values = self.metric.compute_with((extra, *self._hard_negative_ids(extra.device)), drop_missing=True)
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
        classes = datamodule.classification(stage, name)
        query_types = datamodule.query_types(stage, name)
        if spec.task == "qa":
            categories = qa_layout(datamodule.set_records(stage, name), spec.category_field)[2]
            metric: Metric = QARetrievalAccuracy(category_names=categories)
        elif spec.task == "classification":
            metric = ZeroShotClassification(multi_label=classes.multi_label)
        else:
            metric = AudioTextRetrieval(
                names=DIRECTION_NAMES[spec.task],
                text_text=spec.text_text,
                diagnostics=spec.diagnostics,
                query_types=None if query_types is None else query_types[1],
            )
        hard_negatives = datamodule.hard_negatives(stage, name)
        instruction = getattr(datamodule, "document_instruction", None)
        evaluators.append(
            Evaluator(name, spec, metric.to(device), hard_negatives, instruction, classes, query_types)
        )
    return evaluators


def mean_over_sets(values: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
    """``<stage>/<metric>``: the mean over named sets of each recall / mAP (and chance level) in
    :data:`AVERAGED`. Keys of the unnamed set (no set level) are not averaged."""
    groups: dict[str, list[Tensor]] = {}
    for key, value in values.items():
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[0] == stage and parts[1] not in METRIC_GROUPS and AVERAGED.match(parts[2]):
            groups.setdefault(f"{stage}/{parts[2]}", []).append(value)
    return {key: torch.stack(group).mean() for key, group in groups.items()}
