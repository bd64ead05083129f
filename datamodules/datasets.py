"""Map-style datasets that turn clip records into query/document inputs.

Items are dicts consumed by the model's collator::

    {
        "query": EmbedInput,              # audio (or audio + question for QA rows)
        "documents": list[EmbedInput],    # text side: one caption in training, all in evaluation
        "clip_index": int,                # position of the clip in the record list
        "clip_id": str,
        "audio_path": str,                # the clip's audio file, as the manifest resolved it
        "source": str,                    # "manifest:line" of the row, for error messages
        "caption_kind": str,              # caption field the document came from, "qa" or "text_pair"
        "tags": list[str],
        "negatives": list[EmbedInput],    # text pairs' hard negatives (training only; may be absent)
    }

Randomness (which caption, where to crop) is a pure function of ``(seed, epoch, index)``, so an item
is the same whichever worker process builds it. Data-loader workers hold copies of the dataset, so
an epoch set on the main process's copy would not reach persistent workers; :class:`EpochSampler`
therefore sends the epoch along with each index, and :class:`PairDataset` accepts ``(epoch, index)``
keys as well as plain indices (which use the epoch from :meth:`PairDataset.set_epoch`).

A clip whose audio fails to decode raises :class:`~datamodules.audio.AudioDecodeError` naming the
manifest row and the file, or, with ``on_bad_sample="skip"``, the dataset returns a
:class:`~datamodules.bad_samples.SkippedSample` in the item's place, which the collator drops and
counts (see :class:`datamodules.collate.PairCollator`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler

from datamodules.audio import AudioDecodeError, AudioPolicy, load_audio
from datamodules.bad_samples import BadSamplePolicy, SkippedSample
from datamodules.manifest import ClipRecord
from datamodules.inputs import EmbedInput

__all__ = ["EpochSampler", "EvalDataset", "PairDataset", "qa_query_text"]


def qa_query_text(record: ClipRecord) -> str:
    """The text side of an audio-QA row's query: its question, then its choices if it has any."""
    text = record.extra["question"]
    choices = record.texts("choices")
    if choices:
        text = f"{text}\nChoices: {'; '.join(choices)}"
    return text


def _query(record: ClipRecord, wave: np.ndarray, instruction: str | None, ask: bool = True) -> EmbedInput:
    """The query side; QA rows add their question unless ``ask`` is false (e.g. speech→text retrieval)."""
    instruction = record.extra.get("instruction", instruction)
    text = qa_query_text(record) if record.is_qa and ask else None
    return EmbedInput(audio=wave, text=text, instruction=instruction)


def _load(
    record: ClipRecord,
    sampling_rate: int,
    policy: AudioPolicy,
    on_bad_sample: BadSamplePolicy,
    train: bool = False,
    rng: np.random.Generator | None = None,
) -> np.ndarray | SkippedSample:
    """The clip's cropped waveform; a clip that fails to decode raises or, under ``skip``, becomes a marker."""
    try:
        return load_audio(record.audio_path, sampling_rate, policy, train, rng, data=record.audio_data)
    except AudioDecodeError as err:
        if on_bad_sample == "skip":
            return SkippedSample(err.reason, record.source, record.audio_path, str(err))
        raise AudioDecodeError(f"{record.source}: {err}", err.reason, record.audio_path) from err


def _item(
    record: ClipRecord, index: int, query: EmbedInput, texts: list[str], kind: str, instruction: str | None
) -> dict[str, Any]:
    return {
        "query": query,
        "documents": [EmbedInput(text=text, instruction=instruction) for text in texts],
        "clip_index": index,
        "clip_id": record.id,
        "audio_path": record.audio_path,
        "source": record.source,
        "caption_kind": kind,
        "tags": record.tags,
    }


class PairDataset(Dataset):
    """Training pairs: one item per clip per epoch, with one caption drawn at random.

    The caption is drawn by first picking uniformly among the ``caption_fields`` the clip has, then
    uniformly among that field's texts. Audio QA rows (``question`` + ``answer``) become
    ``query = audio + question (+ choices)``, ``document = answer`` with ``caption_kind = "qa"``.
    Text pairs (rows with ``query_text`` and ``document_text``, e.g. the SimCSE NLI pairs of
    AuroLA's text pre-training stage) become ``query = query_text``, ``document = document_text``
    with ``caption_kind = "text_pair"``; with ``hard_negatives`` their ``hard_negatives`` texts
    become the item's ``negatives``, extra documents of the batch (AuroLA leaves them unused). No
    audio is read for them.

    Args:
        records: clips from :func:`datamodules.manifest.read_manifest`.
        sampling_rate: rate (Hz) the audio is resampled to.
        policy: crop/pad rule; random crops when ``train``.
        train: random crop (``True``) or head crop (``False``).
        seed: base seed; with the epoch and the index it fixes every random choice.
        caption_fields: fields to sample captions from: ``caption``, ``caption_long``,
            ``caption_short``, ``tags`` (joined with ``", "``) or any other text field of the rows.
        query_instruction: instruction attached to the audio side; a row's ``instruction`` field
            overrides it.
        document_instruction: instruction attached to the text side.
        on_bad_sample: ``"error"`` raises on a clip that fails to decode; ``"skip"`` returns a
            :class:`~datamodules.bad_samples.SkippedSample` instead of the item.
        hard_negatives: give text pairs their ``hard_negatives`` as extra documents.
    """

    def __init__(
        self,
        records: Sequence[ClipRecord],
        sampling_rate: int,
        policy: AudioPolicy,
        train: bool = True,
        seed: int = 0,
        caption_fields: Sequence[str] = ("caption",),
        query_instruction: str | None = None,
        document_instruction: str | None = None,
        on_bad_sample: BadSamplePolicy = "error",
        hard_negatives: bool = True,
    ):
        if not caption_fields:
            raise ValueError("caption_fields must name at least one field")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.records = list(records)
        self.sampling_rate = sampling_rate
        self.policy = policy
        self.train = train
        self.seed = seed
        self.caption_fields = tuple(caption_fields)
        self.query_instruction = query_instruction
        self.document_instruction = document_instruction
        self.on_bad_sample = on_bad_sample
        self.hard_negatives = hard_negatives
        self.epoch = 0
        for record in self.records:
            if not self.has_texts(record):
                raise ValueError(f"{record.source}: clip '{record.id}' has none of the fields {self.caption_fields}")

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain integer indices (``(epoch, index)`` keys carry their own)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _fields_of(self, record: ClipRecord) -> list[str]:
        return [name for name in self.caption_fields if record.texts(name)]

    def _rngs(self, epoch: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
        # Separate streams, so changing the crop policy does not change which captions are drawn.
        caption_seq, crop_seq = np.random.SeedSequence([self.seed, epoch, index]).spawn(2)
        return np.random.default_rng(caption_seq), np.random.default_rng(crop_seq)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | SkippedSample:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        return self.item(self.records[index], index, epoch)

    def has_texts(self, record: ClipRecord) -> bool:
        """Whether the record can be a training pair: it has one of the ``caption_fields``, or is
        an audio-QA row or a text pair."""
        return record.is_qa or record.is_text_pair or bool(self._fields_of(record))

    def item(self, record: ClipRecord, index: int, epoch: int) -> dict[str, Any] | SkippedSample:
        """The training item of ``record`` as clip ``index`` in ``epoch`` (what ``self[(epoch,
        index)]`` gives for the records held here; a stream of records read elsewhere, e.g. from
        WebDataset shards, uses it with its own indices)."""
        if record.is_text_pair:
            return self._text_pair(record, index)
        caption_rng, crop_rng = self._rngs(epoch, index)
        wave = _load(record, self.sampling_rate, self.policy, self.on_bad_sample, self.train, crop_rng)
        if isinstance(wave, SkippedSample):
            return wave
        query = _query(record, wave, self.query_instruction)
        if record.is_qa:
            return _item(record, index, query, [record.extra["answer"]], "qa", self.document_instruction)
        fields = self._fields_of(record)
        kind = fields[int(caption_rng.integers(len(fields)))]
        texts = record.texts(kind)
        caption = texts[int(caption_rng.integers(len(texts)))]
        return _item(record, index, query, [caption], kind, self.document_instruction)

    def _text_pair(self, record: ClipRecord, index: int) -> dict[str, Any]:
        query = EmbedInput(text=record.extra["query_text"], instruction=self.query_instruction)
        item = _item(record, index, query, list(record.captions[:1]), "text_pair", self.document_instruction)
        negatives = record.texts("hard_negatives") if self.hard_negatives else []
        item["negatives"] = [EmbedInput(text=text, instruction=self.document_instruction) for text in negatives]
        return item


class EvalDataset(Dataset):
    """Evaluation items: every clip once, with all its captions and a head crop; nothing random.

    ``documents`` holds all the clip's captions (for AudioCaps/Clotho, the 5 references); audio QA
    rows give their answer.

    With ``text_field`` other than ``caption`` the documents are that field's texts (e.g. the
    transcripts of a speech–text set). With ``qa`` (QA by retrieval) the documents are the item's
    choices, and the item also carries ``answer_slot`` (position of the answer among them) and
    ``category_index`` (-1 for none). Without ``with_documents`` (zero-shot classification, whose
    candidates are the class prompts, embedded once per evaluation) items have no documents.

    Args:
        records: clips from :func:`datamodules.manifest.read_manifest`.
        sampling_rate: rate (Hz) the audio is resampled to.
        policy: crop/pad rule (head crop).
        query_instruction: instruction attached to the audio side; a row's ``instruction`` field
            overrides it.
        document_instruction: instruction attached to the text side.
        text_field: field whose texts are the documents of non-QA rows.
        qa: ``(answer_slots, category_indices)`` per record, from :func:`datamodules.eval_sets.qa_layout`.
        with_documents: whether items carry their texts as documents.
        on_bad_sample: ``"error"`` raises on a clip that fails to decode; ``"skip"`` returns a
            :class:`~datamodules.bad_samples.SkippedSample` instead of the item.
    """

    def __init__(
        self,
        records: Sequence[ClipRecord],
        sampling_rate: int,
        policy: AudioPolicy,
        query_instruction: str | None = None,
        document_instruction: str | None = None,
        text_field: str = "caption",
        qa: tuple[list[int], list[int]] | None = None,
        on_bad_sample: BadSamplePolicy = "error",
        with_documents: bool = True,
    ):
        self.records = list(records)
        self.sampling_rate = sampling_rate
        self.policy = policy
        self.query_instruction = query_instruction
        self.document_instruction = document_instruction
        self.text_field = text_field
        self.qa = qa
        self.on_bad_sample = on_bad_sample
        self.with_documents = with_documents
        if qa is not None and not (len(qa[0]) == len(qa[1]) == len(self.records)):
            raise ValueError("qa layout needs one answer slot and one category per record")
        for record in self.records:
            if record.is_text_pair:
                raise ValueError(
                    f"{record.source}: text pairs (query_text/document_text) are training rows; evaluate on "
                    "audio sets"
                )
        for record in self.records if qa is None and with_documents else ():
            if not (record.is_qa and text_field == "caption") and not record.texts(text_field):
                raise ValueError(f"{record.source}: clip '{record.id}' has no '{text_field}' text to retrieve")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        record = self.records[index]
        wave = _load(record, self.sampling_rate, self.policy, self.on_bad_sample)
        if isinstance(wave, SkippedSample):
            return wave
        ask = self.qa is not None or self.text_field == "caption"
        query = _query(record, wave, self.query_instruction, ask)
        if not self.with_documents:
            return _item(record, index, query, [], "label", self.document_instruction)
        if self.qa is not None:
            item = _item(record, index, query, record.texts("choices"), "qa", self.document_instruction)
            item["answer_slot"], item["category_index"] = self.qa[0][index], self.qa[1][index]
            return item
        if record.is_qa and self.text_field == "caption":
            return _item(record, index, query, [record.extra["answer"]], "qa", self.document_instruction)
        return _item(record, index, query, record.texts(self.text_field), self.text_field, self.document_instruction)


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys, shuffled per epoch from ``seed``, for :class:`PairDataset`.

    Lightning calls :meth:`set_epoch` before each training epoch (and forwards it through the
    wrapper it puts around custom samplers under DDP). Because the epoch travels inside each key,
    workers, persistent or not, draw captions and crops for the right epoch. Every rank computes the
    same order, so Lightning's distributed wrapper shards it without overlap.

    Args:
        num_items: dataset length.
        shuffle: permute the indices each epoch.
        seed: base seed of the permutation.
    """

    def __init__(self, num_items: int, shuffle: bool = True, seed: int = 0):
        self.num_items = num_items
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and random draws the next iteration uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.arange(self.num_items)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        epoch = self.epoch
        return iter([(epoch, int(index)) for index in order])
