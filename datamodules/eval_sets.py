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
- ``classification``: zero-shot classification as CLAP evaluates it (ESC-50, UrbanSound8K, VGGSound
  single-label; AudioSet, FSD50K multi-label): every class name becomes one or more text prompts
  ("This is a sound of {label}."), embedded on the document side; a clip's class scores are its
  similarities to the class embeddings. Rows carry ``label`` (single-label) or ``labels``
  (multi-label); the classes are those of a ``classes`` file (one name per line) or, without one,
  every label of the manifest in sorted order.

Retrieval rows may name the kind of each caption as a query with ``query_type`` (a string for all
the row's texts, or a list with one entry per text, e.g. ``["question", "keyphrase", ...]``); T2A
is then also reported per type.

Hard-negative files are JSONL, one triple per line::

    {"query": "a dog barks, then a car passes", "target": "clip_17", "negative": "clip_42"}

``target`` and ``negative`` are clip ids of the set's manifest; ``query`` is embedded as a text
(document side, like the captions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from datamodules.formats import ManifestSpec
from datamodules.manifest import ClipRecord, ManifestError, open_manifest

__all__ = [
    "ClassificationLayout",
    "EvalSet",
    "HardNegative",
    "classification_layout",
    "qa_layout",
    "query_type_layout",
    "read_classes",
    "read_hard_negatives",
]

#: metric-key prefixes of each retrieval task: (text -> audio, audio -> text).
DIRECTION_NAMES = {"audio_text": ("t2a", "a2t"), "speech_text": ("t2s", "s2t")}
#: the evaluation tasks.
TASKS = ("audio_text", "speech_text", "qa", "classification")
#: CLAP's zero-shot prompt.
DEFAULT_TEMPLATE = "This is a sound of {label}."
#: per-set size keys, reported next to the metrics (``<stage>/<set>/n_audios``).
SIZE_KEYS = ("n_audios", "n_texts", "n_queries")
#: the first level of every metric key after the stage and set name; set names must differ from them.
METRIC_GROUPS = (
    tuple(prefix for pair in DIRECTION_NAMES.values() for prefix in pair)
    + ("t2t", "hn", "qa", "zs", "diag", "chance")
    + SIZE_KEYS
)


@dataclass
class EvalSet:
    """One evaluation benchmark.

    Args:
        manifest: a path (JSONL rows, a ``.json`` list or WavCaps file, a Clotho or AudioCaps CSV, a
            Hugging Face dataset; format detected) or a ``ManifestSpec`` mapping (see
            :mod:`datamodules.formats`).
        task: ``audio_text``, ``speech_text`` or ``qa`` (see the module docstring).
        audio_dir: audio folder of a manifest whose rows name files, when its spec gives none
            (default: the data module's ``audio_dir``).
        text_field: field holding each clip's texts for the retrieval tasks: ``caption`` (default), or
            e.g. ``question`` for speech clips stored as QA rows.
        hard_negatives: JSONL file of ``{"query", "target", "negative"}`` triples (audio_text and
            speech_text only); adds ``hn/HNSR@k`` and ``hn/delta_rank_*``.
        text_text: also report caption→caption retrieval between captions of the same clip (``t2t/...``).
        diagnostics: also report the modality gap, MMD, alignment and uniformity (``diag/...``).
        category_field: for ``qa``, the row field whose value groups the per-category accuracy.
        classes: for ``classification``, a text file naming the classes, one per line (blank lines
            ignored); every row's labels must be among them. ``None``: the labels found in the
            manifest, sorted.
        templates: for ``classification``, the prompt templates, each with one ``{label}`` field.
            With several, each class embedding is the mean of its normalised prompt embeddings,
            normalised again (the prompt ensembling of CLIP and CLAP).
    """

    manifest: str | ManifestSpec
    task: Literal["audio_text", "speech_text", "qa", "classification"] = "audio_text"
    audio_dir: str | None = None
    text_field: str = "caption"
    hard_negatives: str | None = None
    text_text: bool = False
    diagnostics: bool = False
    category_field: str = "category"
    classes: str | None = None
    templates: list[str] = field(default_factory=lambda: [DEFAULT_TEMPLATE])

    def __post_init__(self) -> None:
        if isinstance(self.manifest, dict):
            self.manifest = ManifestSpec(**self.manifest)
        if self.task not in TASKS:
            raise ValueError(f"unknown evaluation task {self.task!r} ({', '.join(TASKS)})")
        if self.task in ("qa", "classification") and (self.hard_negatives or self.text_text):
            raise ValueError(f"{self.manifest}: hard_negatives and text_text need a retrieval task, not {self.task}")
        if self.task == "classification" and self.diagnostics:
            raise ValueError(f"{self.manifest}: diagnostics need caption pairs, which a classification set has not")
        if not self.templates:
            raise ValueError(f"{self.manifest}: templates must hold at least one prompt template")
        for template in self.templates:
            try:
                filled = template.format(label="\0")
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"{self.manifest}: template {template!r} may only use the field {{label}}") from err
            if filled == template.format(label=""):
                raise ValueError(f"{self.manifest}: template {template!r} has no {{label}} field")


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


def query_type_layout(records: list[ClipRecord], text_field: str) -> tuple[list[list[int]], list[str]] | None:
    """The query type of every text of every clip, as indices into the sorted type names.

    Returns ``None`` when no row has ``query_type``; texts of rows without one get -1 (they count in
    the overall metrics only).

    Raises:
        ManifestError: naming the row when a ``query_type`` list does not have one entry per text,
            or a type name contains ``/`` (it becomes a level of the metric key).
    """
    if not any("query_type" in record.extra for record in records):
        return None
    per_record: list[list[str | None]] = []
    for record in records:
        count = len(record.texts(text_field))
        value = record.extra.get("query_type")
        types = [value] * count if isinstance(value, str) or value is None else list(value)
        if len(types) != count:
            raise ManifestError(
                f"{record.source}: 'query_type' has {len(types)} entries for the row's {count} '{text_field}' texts"
            )
        for name in types:
            if name is not None and "/" in name:
                raise ManifestError(f"{record.source}: query type {name!r} must not contain '/'")
        per_record.append(types)
    names = sorted({name for types in per_record for name in types if name is not None})
    return [[names.index(t) if t is not None else -1 for t in types] for types in per_record], names


@dataclass(frozen=True)
class ClassificationLayout:
    """The classes of a zero-shot classification set and each clip's labels.

    Attributes:
        classes: class names, in the order of the class embeddings.
        targets: per clip, the indices of its classes (exactly one for single-label sets).
        multi_label: whether the rows carry ``labels`` (several per clip) rather than ``label``.
    """

    classes: list[str]
    targets: list[list[int]]
    multi_label: bool

    def prompts(self, templates: list[str]) -> list[str]:
        """Every class's prompts, class by class: ``len(classes) * len(templates)`` texts."""
        return [template.format(label=name) for name in self.classes for template in templates]


def read_classes(path: str) -> list[str]:
    """Class names from a text file, one per line (surrounding whitespace and blank lines ignored).

    Raises:
        ManifestError: naming the file (and line) when it cannot be read, repeats a name or is empty.
    """
    try:
        handle = open(path, encoding="utf-8")
    except OSError as err:
        raise ManifestError(f"class file cannot be read: {path} ({err.strerror})") from err
    names: dict[str, int] = {}
    with handle:
        for line_no, line in enumerate(handle, start=1):
            name = line.strip()
            if not name:
                continue
            if name in names:
                raise ManifestError(f"{path}:{line_no}: class {name!r} repeats line {names[name]}")
            names[name] = line_no
    if not names:
        raise ManifestError(f"{path}: the class file names no classes")
    return list(names)


def classification_layout(records: list[ClipRecord], classes: str | None = None) -> ClassificationLayout:
    """Classes and per-clip labels of a classification set (see :class:`ClassificationLayout`).

    Raises:
        ManifestError: naming the row when it has neither or both of ``label`` and ``labels``, when
            the set mixes the two, or when a label is not in the ``classes`` file.
    """
    kinds = set()
    labels: list[list[str]] = []
    for record in records:
        has = [name for name in ("label", "labels") if name in record.extra]
        if len(has) != 1:
            raise ManifestError(
                f"{record.source}: a classification row needs exactly one of 'label' (single-label) and 'labels' "
                f"(multi-label), got {has or 'neither'}"
            )
        kinds.add(has[0])
        if len(kinds) > 1:
            raise ManifestError(f"{record.source}: the set mixes 'label' and 'labels' rows; use one of them")
        labels.append([record.extra["label"]] if has[0] == "label" else list(dict.fromkeys(record.texts("labels"))))
    names = read_classes(classes) if classes is not None else sorted({name for row in labels for name in row})
    index = {name: i for i, name in enumerate(names)}
    targets = []
    for record, row in zip(records, labels):
        missing = [name for name in row if name not in index]
        if missing:
            raise ManifestError(f"{record.source}: label {missing[0]!r} is not a class of {classes}")
        targets.append([index[name] for name in row])
    return ClassificationLayout(names, targets, kinds == {"labels"})
