"""Evaluation sets: several benchmarks per run, each with its own task and name.

A run can validate and test on several sets at once (AudioCaps and Clotho, a speech–text set, an
audio-QA set, ...). Each :class:`EvalSet` names a manifest and the task it is scored with; its
metrics are reported under ``<stage>/<set name>/...`` (see :class:`EmbeddingModule`).

Tasks:

- ``audio_text``: the AudioCaps/Clotho protocol (DESIGN.md section 5). Every caption is a T2A query
  with one relevant audio; every audio is an A2T query whose relevant captions are its own.
  Optional extras on the same embeddings: caption→caption retrieval (``text_text``), embedding
  diagnostics (``diagnostics``) and hard-negative metrics (``hard_negatives``, Omni-Embed-Audio,
  arXiv 2604.18360).
- ``speech_text``: the same protocol on speech clips and their transcripts or spoken questions
  (LibriSQA style), reported as ``t2s``/``s2t``.
- ``qa``: QA by retrieval (MMAU-mini style, as ALM2Vec reports it): the query is the question (+
  instruction) with the audio, the candidates are the item's own choices embedded as documents;
  accuracy overall and per category.

Hard-negative files are JSONL, one triple per line::

    {"query": "a dog barks, then a car passes", "target": "clip_17", "negative": "clip_42"}

``target`` and ``negative`` are clip ids of the set's manifest; ``query`` is embedded as a text
(document side, like the captions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from datamodules.manifest import ClipRecord, ManifestError, open_manifest

__all__ = ["EvalSet", "HardNegative", "qa_layout", "read_hard_negatives"]

#: metric-key prefixes of each retrieval task: (text -> audio, audio -> text).
DIRECTION_NAMES = {"audio_text": ("t2a", "a2t"), "speech_text": ("t2s", "s2t")}


@dataclass
class EvalSet:
    """One evaluation benchmark.

    Args:
        manifest: JSONL rows or an AudioCaps/Clotho ``.json`` list (see :mod:`datamodules.manifest`).
        task: ``audio_text``, ``speech_text`` or ``qa`` (see the module docstring).
        audio_dir: audio folder of a ``.json`` list manifest (default: the data module's ``audio_dir``).
        text_field: field holding each clip's texts for the retrieval tasks: ``caption`` (default), or
            e.g. ``question`` for speech clips stored as QA rows.
        hard_negatives: JSONL file of ``{"query", "target", "negative"}`` triples (audio_text and
            speech_text only); adds ``hn/HNSR@k`` and ``hn/delta_rank_*``.
        text_text: also report caption→caption retrieval between captions of the same clip (``t2t/...``).
        diagnostics: also report the modality gap, MMD, alignment and uniformity (``diag/...``).
        category_field: for ``qa``, the row field whose value groups the per-category accuracy.
    """

    manifest: str
    task: Literal["audio_text", "speech_text", "qa"] = "audio_text"
    audio_dir: str | None = None
    text_field: str = "caption"
    hard_negatives: str | None = None
    text_text: bool = False
    diagnostics: bool = False
    category_field: str = "category"

    def __post_init__(self) -> None:
        if self.task not in ("audio_text", "speech_text", "qa"):
            raise ValueError(f"unknown evaluation task {self.task!r} (audio_text, speech_text or qa)")
        if self.task == "qa" and (self.hard_negatives or self.text_text):
            raise ValueError(f"{self.manifest}: hard_negatives and text_text need a retrieval task, not qa")


@dataclass(frozen=True)
class HardNegative:
    """A text query, the clip it describes and a clip that nearly matches it (positions in the set)."""

    query: str
    target: int
    negative: int


def read_hard_negatives(path: str, records: list[ClipRecord]) -> list[HardNegative]:
    """Parse a hard-negative JSONL file against the clips of its evaluation set.

    Raises:
        ManifestError: naming ``path:line`` for invalid JSON, missing or empty fields, a clip id that
            is not in the set, a triple whose target is its negative, or a file without triples.
    """
    index = {record.id: i for i, record in enumerate(records)}
    triples: list[HardNegative] = []
    try:
        handle = open_manifest(path)
    except OSError as err:
        raise ManifestError(f"hard-negative file cannot be read: {path} ({err.strerror})") from err
    with handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ManifestError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(row, dict):
                raise ManifestError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
            for name in ("query", "target", "negative"):
                if not isinstance(row.get(name), str) or not row[name].strip():
                    raise ManifestError(f"{where}: '{name}' must be a non-empty string, got {row.get(name)!r}")
            for name in ("target", "negative"):
                if row[name] not in index:
                    raise ManifestError(f"{where}: {name} '{row[name]}' is not a clip id of the evaluation set")
            if row["target"] == row["negative"]:
                raise ManifestError(f"{where}: target and negative are the same clip '{row['target']}'")
            triples.append(HardNegative(row["query"], index[row["target"]], index[row["negative"]]))
    if not triples:
        raise ManifestError(f"{path}: the hard-negative file holds no triples")
    return triples


def qa_layout(records: list[ClipRecord], category_field: str) -> tuple[list[int], list[int], list[str]]:
    """Answer position among the choices, category index and category names of a QA set.

    Raises:
        ManifestError: naming the row when it is not a QA row, has no choices, or its answer is not
            one of its choices (compared after stripping whitespace).
    """
    answers: list[int] = []
    categories: list[str | None] = []
    for record in records:
        if not record.is_qa:
            raise ManifestError(f"{record.source}: a qa evaluation set needs 'question' and 'answer' in every row")
        choices = [choice.strip() for choice in record.texts("choices")]
        if not choices:
            raise ManifestError(f"{record.source}: qa row has no 'choices' to retrieve the answer from")
        answer = record.extra["answer"].strip()
        if answer not in choices:
            raise ManifestError(f"{record.source}: answer {answer!r} is not among the choices {choices}")
        answers.append(choices.index(answer))
        category = record.extra.get(category_field)
        categories.append(None if category is None else str(category))
    names = sorted({c for c in categories if c is not None})
    return answers, [names.index(c) if c is not None else -1 for c in categories], names
