"""Collation of retrieval examples into query-side and document-side backbone inputs."""

from __future__ import annotations

from typing import Any

import torch

from datamodules.bad_samples import SkippedSample, count_reasons
from lightning_modules.backbones.base import Collator
from lightning_modules.inputs import EmbedInput

# Documents of one clip get keys clip_index * MAX_DOCS_PER_CLIP + j, unique across the dataset.
MAX_DOCS_PER_CLIP = 1000


def side_modality(items: list[EmbedInput]) -> str:
    modalities = {item.modality for item in items}
    if len(modalities) != 1:
        raise ValueError(f"one side of a batch mixes modalities {sorted(modalities)}; keep each side homogeneous")
    return modalities.pop()


class PairCollator:
    """Turns dataset examples into a batch the :class:`EmbeddingModule` consumes.

    An example is a dict with ``query`` (an :class:`EmbedInput`), ``documents`` (a list of them: one
    sampled caption when training, all captions when evaluating), ``clip_index`` and optional
    metadata (``clip_id``, ``caption_kind``, ``tags``). The batch holds the backbone inputs of both
    sides, their modalities, the clip index of every query and document, and unique document keys.

    Examples without documents (zero-shot classification, whose class prompts are embedded once per
    evaluation) give ``batch["document"] = None`` and no document modality.

    Examples a dataset skipped (:class:`~datamodules.bad_samples.SkippedSample` markers, under the
    ``skip`` bad-sample policy) are dropped, never replaced, and counted in ``batch["skipped"]``
    (``{reason: count}``, empty when none). When every example of a batch was skipped, the batch is
    ``{"empty": True, "skipped": {...}}`` only; :class:`EmbeddingModule` steps return at once for it
    (no loss, no optimiser step, nothing embedded).
    """

    def __init__(self, backbone_collator: Collator):
        self.backbone_collator = backbone_collator

    def __call__(self, examples: list[dict[str, Any] | SkippedSample]) -> dict[str, Any]:
        skipped = dict(count_reasons(ex for ex in examples if isinstance(ex, SkippedSample)))
        examples = [ex for ex in examples if not isinstance(ex, SkippedSample)]
        if not examples:
            return {"empty": True, "skipped": skipped}
        queries = [ex["query"] for ex in examples]
        documents, document_index, document_key = [], [], []
        for ex in examples:
            if len(ex["documents"]) > MAX_DOCS_PER_CLIP:
                raise ValueError(f"clip {ex.get('clip_id')} has more than {MAX_DOCS_PER_CLIP} documents")
            for j, doc in enumerate(ex["documents"]):
                documents.append(doc)
                document_index.append(ex["clip_index"])
                document_key.append(ex["clip_index"] * MAX_DOCS_PER_CLIP + j)
        batch = {
            "query": self.backbone_collator(queries),
            "document": self.backbone_collator(documents) if documents else None,
            "query_modality": side_modality(queries),
            "document_modality": side_modality(documents) if documents else None,
            "query_index": torch.tensor([ex["clip_index"] for ex in examples], dtype=torch.long),
            "document_index": torch.tensor(document_index, dtype=torch.long),
            "document_key": torch.tensor(document_key, dtype=torch.long),
            "texts": [doc.text for doc in documents],
            "clip_ids": [ex.get("clip_id", str(ex["clip_index"])) for ex in examples],
            "caption_kinds": [ex.get("caption_kind", "caption") for ex in examples],
            "tags": [ex.get("tags", []) for ex in examples],
            "skipped": skipped,
        }
        if "answer_slot" in examples[0]:  # QA by retrieval: the document key of each query's answer
            batch["answer_key"] = torch.tensor(
                [ex["clip_index"] * MAX_DOCS_PER_CLIP + ex["answer_slot"] for ex in examples], dtype=torch.long
            )
            batch["category_index"] = torch.tensor([ex["category_index"] for ex in examples], dtype=torch.long)
        return batch
