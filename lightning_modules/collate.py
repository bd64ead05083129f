"""Collation of retrieval examples into query-side and document-side backbone inputs."""

from __future__ import annotations

from typing import Any

import torch

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
    """

    def __init__(self, backbone_collator: Collator):
        self.backbone_collator = backbone_collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        queries = [ex["query"] for ex in examples]
        documents, document_index, document_key = [], [], []
        for ex in examples:
            if len(ex["documents"]) > MAX_DOCS_PER_CLIP:
                raise ValueError(f"clip {ex.get('clip_id')} has more than {MAX_DOCS_PER_CLIP} documents")
            for j, doc in enumerate(ex["documents"]):
                documents.append(doc)
                document_index.append(ex["clip_index"])
                document_key.append(ex["clip_index"] * MAX_DOCS_PER_CLIP + j)
        return {
            "query": self.backbone_collator(queries),
            "document": self.backbone_collator(documents),
            "query_modality": side_modality(queries),
            "document_modality": side_modality(documents),
            "query_index": torch.tensor([ex["clip_index"] for ex in examples], dtype=torch.long),
            "document_index": torch.tensor(document_index, dtype=torch.long),
            "document_key": torch.tensor(document_key, dtype=torch.long),
            "texts": [doc.text for doc in documents],
            "clip_ids": [ex.get("clip_id", str(ex["clip_index"])) for ex in examples],
            "caption_kinds": [ex.get("caption_kind", "caption") for ex in examples],
            "tags": [ex.get("tags", []) for ex in examples],
        }
