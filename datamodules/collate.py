"""Collation of retrieval examples into query-side and document-side backbone inputs."""

from __future__ import annotations

from typing import Any

import torch

from datamodules.bad_samples import SkippedSample, count_reasons
from datamodules.inputs import Collator, EmbedInput
from datamodules.text_limits import PromptTooLongError
from losses.structure import BatchInfo
from losses.tag_clusters import TagClusterMap

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
    metadata (``clip_id``, ``audio_path``, ``caption_kind``, ``tags``). The batch holds the backbone
    inputs of both sides, their modalities, the clip index of every query and document, unique
    document keys, the clips' string ``clip_ids`` (for messages) and ``audio_paths``, the document
    ``texts``, and for training batches ``info``, the :class:`~losses.structure.BatchInfo` the loss
    receives (clip indices, texts, caption kinds and tag clusters, mapped through ``tag_clusters``).

    Examples without documents (zero-shot classification, whose class prompts are embedded once per
    evaluation) give ``batch["document"] = None`` and no document modality.

    Training examples may carry ``negatives`` (:class:`EmbedInput` s, e.g. the hard negatives of
    text pairs): they follow every example's documents on the document side, as the loss's extra
    negatives (``info.extra_texts``; document index and key -1), so ``batch["document"]`` then has
    more rows than ``batch["query"]``.

    Examples a dataset skipped (:class:`~datamodules.bad_samples.SkippedSample` markers, under the
    ``skip`` bad-sample policy) are dropped, never replaced, and counted in ``batch["skipped"]``
    (``{reason: count}``, empty when none). When every example of a batch was skipped, the batch is
    ``{"empty": True, "skipped": {...}}`` only; :class:`EmbeddingModule` steps return at once for it
    (no loss, no optimiser step, nothing embedded).

    The backbone collator's :meth:`truncate` cuts each side's texts to its ``max_text_tokens`` (see
    :mod:`datamodules.text_limits`); the inputs it cut are counted in ``batch["truncated"]``
    (``{"query": n, "document": m}``) and ``texts`` holds the documents as embedded. A prompt over
    ``max_prompt_tokens`` stops with a :class:`~datamodules.text_limits.PromptTooLongError` naming
    the example's ``source`` (``manifest:line``) and clip id.

    Args:
        backbone_collator: the backbone's input builder.
        tag_clusters: groups synonymous tags into clusters for the loss's tag positives; ``None``:
            every tag is its own cluster.
    """

    def __init__(self, backbone_collator: Collator, tag_clusters: TagClusterMap | None = None):
        self.backbone_collator = backbone_collator
        self.tag_clusters = tag_clusters if tag_clusters is not None else TagClusterMap({})

    def __call__(self, examples: list[dict[str, Any] | SkippedSample]) -> dict[str, Any]:
        skipped = dict(count_reasons(ex for ex in examples if isinstance(ex, SkippedSample)))
        examples = [ex for ex in examples if not isinstance(ex, SkippedSample)]
        if not examples:
            return {"empty": True, "skipped": skipped}
        queries, truncated_queries = self.backbone_collator.truncate([ex["query"] for ex in examples])
        documents, document_owner, document_index, document_key = [], [], [], []
        for owner, ex in enumerate(examples):
            if len(ex["documents"]) > MAX_DOCS_PER_CLIP:
                raise ValueError(f"clip {ex.get('clip_id')} has more than {MAX_DOCS_PER_CLIP} documents")
            for j, doc in enumerate(ex["documents"]):
                documents.append(doc)
                document_owner.append(owner)
                document_index.append(ex["clip_index"])
                document_key.append(ex["clip_index"] * MAX_DOCS_PER_CLIP + j)
        pairs = len(documents)
        for owner, ex in enumerate(examples):
            for doc in ex.get("negatives", ()):  # extra negatives follow every example's documents
                documents.append(doc)
                document_owner.append(owner)
                document_index.append(-1)
                document_key.append(-1)
        documents, truncated_documents = self.backbone_collator.truncate(documents)
        query_index = torch.tensor([ex["clip_index"] for ex in examples], dtype=torch.long)
        texts = [doc.text for doc in documents]
        batch = {
            "query": self._side(queries, examples, "query"),
            "document": self._side(documents, [examples[i] for i in document_owner], "document") if documents else None,
            "query_modality": side_modality(queries),
            "document_modality": side_modality(documents) if documents else None,
            "query_index": query_index,
            "document_index": torch.tensor(document_index, dtype=torch.long),
            "document_key": torch.tensor(document_key, dtype=torch.long),
            "texts": texts,
            "clip_ids": [ex.get("clip_id", str(ex["clip_index"])) for ex in examples],
            "audio_paths": [ex.get("audio_path") for ex in examples],
            "skipped": skipped,
            "truncated": {"query": truncated_queries, "document": truncated_documents},
        }
        if pairs == len(examples):  # training: one document per query, the loss's pairs (+ extras)
            batch["info"] = BatchInfo(
                clip_index=query_index,
                texts=texts[:pairs],
                caption_kinds=[ex.get("caption_kind", "caption") for ex in examples],
                tag_clusters=[self.tag_clusters.clusters_for(ex.get("tags", [])) for ex in examples],
                extra_texts=texts[pairs:] if len(texts) > pairs else None,
            )
        if "answer_slot" in examples[0]:  # QA by retrieval: the document key of each query's answer
            batch["answer_key"] = torch.tensor(
                [ex["clip_index"] * MAX_DOCS_PER_CLIP + ex["answer_slot"] for ex in examples], dtype=torch.long
            )
            batch["category_index"] = torch.tensor([ex["category_index"] for ex in examples], dtype=torch.long)
        return batch

    def _side(self, items: list[EmbedInput], owners: list[dict[str, Any]], side: str) -> dict[str, torch.Tensor]:
        """The backbone inputs of one side; ``owners[i]`` is the example input ``i`` comes from."""
        try:
            return self.backbone_collator(items)
        except PromptTooLongError as err:
            owner = owners[err.index]
            where = owner.get("source") or f"clip index {owner['clip_index']}"
            message = f"{where} (clip '{owner.get('clip_id')}'), {side} side: {err}"
            raise PromptTooLongError(message, err.index, err.tokens, err.limit) from None
