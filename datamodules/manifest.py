"""Reading clip lists: JSONL manifests and the AudioCaps/Clotho JSON list format.

Every problem is reported as a :class:`ManifestError` naming the manifest, the line (or list
entry) and, where relevant, the audio file, and audio files are checked for existence while
parsing, so a broken row fails before training starts rather than hours into it. Every row problem
carries a ``reason`` from :data:`datamodules.bad_samples.MANIFEST_REASONS`. Given a ``problems``
list, the readers collect the bad rows there (as :class:`~datamodules.bad_samples.SkippedSample`)
and keep the good ones in order instead of raising; of rows sharing a clip id the first is kept.
Problems of the file as a whole (missing manifest, unknown extension, a JSON list that does not
parse) always raise. :func:`screen_audio` does the same for the audio headers.

JSONL: one object per line, blank lines skipped::

    {"audio": "wav/a.wav", "caption": ["a dog barks", "barking"], "id": "a", "tags": "dog, bark"}
    {"audio": "/abs/b.flac", "question": "What animal?", "answer": "a dog", "choices": ["dog", "cat"]}

``audio`` is relative to the manifest's folder unless absolute. ``caption`` is a string or a list of
strings; rows with ``question`` and ``answer`` (audio QA) may omit it, and so may rows with a class
``label`` (one string) or ``labels`` (a string or a list of strings), the clips of a zero-shot
classification set::

    {"audio": "esc50/1-100032-A-0.wav", "label": "dog"}
    {"audio": "fsd/64760.wav", "labels": ["Bark", "Dog"]}

``query_type`` (a string, or a list with one string per caption) names the kind of each caption as
a query, e.g. ``question``, ``keyphrase`` or ``paraphrase``; evaluation reports T2A per type.

Without ``id`` the clip id is the ``audio`` value as written. Other fields are kept in
:attr:`ClipRecord.extra`; ``tags`` given as a comma-separated string is split into a list.

JSON list (as AuroLA/WavCaps ship AudioCaps and Clotho)::

    [{"video_id": "Y7fmOlUlwoNg", "caption": ["...", "...", "...", "...", "..."]}, ...]

``video_id`` (or ``id``) names a file in ``audio_dir``; when no file has exactly that name, the
extensions .wav .flac .ogg .mp3 are tried in turn. A top-level ``{"data": [...]}`` is accepted too.

Text-only pairs (AuroLA's text pre-training stage) carry no audio: a JSONL row with ``query_text``
and ``document_text`` (optional ``hard_negatives``, a list of texts; optional ``id``, else the row's
``manifest:line``)::

    {"query_text": "A man plays a guitar.", "document_text": "Someone makes music.", "hard_negatives": ["Nobody plays."]}

or the SimCSE NLI CSV (``nli_for_simcse.csv``, read by :mod:`datamodules.formats`). Their records
have ``audio_path = ""``, ``captions = [document_text]`` and ``query_text`` / ``hard_negatives`` in
:attr:`ClipRecord.extra`; the header scan passes them without reading anything.

The annotation files of the public corpora (Clotho and AudioCaps CSVs, WavCaps JSON, Hugging Face
datasets) and the NLI CSV are read by :mod:`datamodules.formats` into the same records, with the
same error and skip rules; :func:`read_manifest` takes a path (format detected) or a
:class:`~datamodules.formats.ManifestSpec`.

Manifests are UTF-8, with or without the byte-order mark that Windows tools and spreadsheets write
at the start of a file: every manifest reader opens its file with :func:`open_manifest`, which drops
a leading BOM (a BOM anywhere else is still an error of its row).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from datamodules.audio import AudioDecodeError, audio_duration
from datamodules.bad_samples import (
    DUPLICATE_ID,
    EMPTY_TEXT,
    INVALID_JSON,
    MISSING_FIELD,
    MISSING_FILE,
    NOT_AN_OBJECT,
    WRONG_TYPE,
    SkippedSample,
)

if TYPE_CHECKING:
    from datamodules.formats import ManifestSpec

__all__ = [
    "AUDIO_EXTENSIONS",
    "ClipRecord",
    "ManifestError",
    "json_list_records",
    "load_json",
    "open_manifest",
    "read_json_list",
    "read_jsonl",
    "read_manifest",
    "row_record",
    "screen_audio",
]

#: extensions tried, in order, when a JSON-list entry names its audio without one.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")

#: extra fields that, when present, must hold a string or a non-empty list of strings.
_TEXT_LIST_FIELDS = ("caption_long", "caption_short", "choices", "labels", "query_type")
#: extra fields that, when present, must hold one non-empty string.
_STRING_FIELDS = ("instruction", "question", "answer", "label")


class ManifestError(ValueError):
    """A manifest row is malformed or points at a missing audio file.

    Attributes:
        reason: one of :data:`datamodules.bad_samples.MANIFEST_REASONS`, or ``None`` for a problem
            that is not about one row.
        source: ``"manifest:line"`` (or ``"manifest:entry N"``) of the row, or the manifest.
        path: the row's audio file, when known.
    """

    def __init__(self, message: str, reason: str | None = None, source: str = "", path: str = ""):
        super().__init__(message)
        self.reason = reason
        self.source = source
        self.path = path

    def skipped(self) -> SkippedSample:
        """This problem as a skipped row."""
        return SkippedSample(self.reason, self.source, self.path, str(self))


@dataclass
class ClipRecord:
    """One audio clip and its texts, as read from a manifest.

    Attributes:
        id: unique clip id within the manifest.
        audio_path: resolved path of the audio file.
        captions: the clip's captions (empty only for audio QA rows).
        extra: every other field of the row (``tags`` normalised to a list of strings).
        source: ``"manifest:line"`` (or ``"manifest:entry N"``), for error messages.
        audio_data: the audio file's bytes when it is not a file on disk (a WebDataset tar member,
            see :mod:`datamodules.shards`); ``audio_path`` then names it (``shard:member``).
    """

    id: str
    audio_path: str
    captions: list[str]
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    audio_data: bytes | None = field(default=None, repr=False)

    @property
    def is_qa(self) -> bool:
        """``True`` for audio question-answering rows (they carry ``question`` and ``answer``)."""
        return "question" in self.extra and "answer" in self.extra

    @property
    def is_text_pair(self) -> bool:
        """``True`` for text-only pairs (``query_text`` + ``document_text``, no audio)."""
        return "query_text" in self.extra

    @property
    def tags(self) -> list[str]:
        """The clip's tags (possibly empty)."""
        return list(self.extra.get("tags", []))

    def texts(self, name: str) -> list[str]:
        """The candidate texts of one caption field.

        ``"caption"`` gives :attr:`captions`; ``"tags"`` gives the tags joined by ``", "``; any other
        name gives that extra field (a string or a list of strings). Missing fields give ``[]``.
        """
        if name == "caption":
            return list(self.captions)
        if name == "tags":
            return [", ".join(self.tags)] if self.tags else []
        value = self.extra.get(name)
        if value is None:
            return []
        return [value] if isinstance(value, str) else list(value)


def open_manifest(path: str, newline: str | None = None) -> TextIO:
    """Open a manifest (JSONL, JSON list, CSV, hard-negative triples) for reading as UTF-8, without a
    leading byte-order mark if it has one. CSV readers pass ``newline=""``, as :mod:`csv` asks."""
    return open(path, encoding="utf-8-sig", newline=newline)


def _error(where: str, message: str, reason: str | None, path: str = "") -> ManifestError:
    """A row's error; the message names the row's audio file when it is known."""
    if path and path not in message:
        message = f"{message} (audio {path})"
    return ManifestError(f"{where}: {message}", reason, where, path)


def _text_list(value: Any, where: str, name: str, path: str) -> list[str]:
    """A string or a non-empty list of non-empty strings, as a list."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        reason = EMPTY_TEXT if items == [] else WRONG_TYPE
        raise _error(
            where, f"'{name}' must be a non-empty string or a non-empty list of strings, got {value!r}", reason, path
        )
    for item in items:
        if not isinstance(item, str) or not item.strip():
            reason = EMPTY_TEXT if isinstance(item, str) else WRONG_TYPE
            raise _error(where, f"'{name}' entries must be non-empty strings, got {item!r}", reason, path)
    return list(items)


def _tag_list(value: Any, where: str, path: str) -> list[str]:
    if isinstance(value, str):
        return [tag.strip() for tag in value.split(",") if tag.strip()]
    if not isinstance(value, list) or not all(isinstance(tag, str) for tag in value):
        raise _error(
            where, f"'tags' must be a list of strings or a comma-separated string, got {value!r}", WRONG_TYPE, path
        )
    return [tag.strip() for tag in value if tag.strip()]


def _record(row: Any, audio_path: str, clip_id: Any, where: str, skip: tuple[str, ...]) -> ClipRecord:
    """Validate one row and build its record (``row`` is a parsed JSON value); the audio file must exist."""
    if not os.path.isfile(audio_path):
        raise _error(where, f"audio file not found: {audio_path}", MISSING_FILE, audio_path)
    return row_record(row, audio_path, clip_id, where, skip)


def row_record(
    row: dict[str, Any],
    audio_path: str,
    clip_id: Any,
    where: str,
    skip: tuple[str, ...] = (),
    caption_field: str = "caption",
) -> ClipRecord:
    """The record of a manifest row (a parsed JSON object), its id and text fields validated as the
    readers validate them; nothing is looked up on disk. ``skip`` names the fields that are not
    extras (e.g. ``audio``, ``caption``, ``id``); ``caption_field`` is the field holding the captions
    (``text`` in a WebDataset sample's JSON).

    Raises:
        ManifestError: a field is missing, empty or of the wrong type; the message starts with ``where``.
    """
    if not isinstance(clip_id, str) or not clip_id:
        reason = MISSING_FIELD if clip_id == "" else WRONG_TYPE
        raise _error(where, f"clip id must be a non-empty string, got {clip_id!r}", reason, audio_path)
    extra = {key: value for key, value in row.items() if key not in skip and key != caption_field}
    for name in _STRING_FIELDS:
        if name in extra and (not isinstance(extra[name], str) or not extra[name].strip()):
            reason = EMPTY_TEXT if isinstance(extra[name], str) else WRONG_TYPE
            raise _error(where, f"'{name}' must be a non-empty string, got {extra[name]!r}", reason, audio_path)
    for name in _TEXT_LIST_FIELDS:
        if name in extra:
            _text_list(extra[name], where, name, audio_path)
    if "tags" in extra:
        extra["tags"] = _tag_list(extra["tags"], where, audio_path)
    if caption_field in row:
        captions = _text_list(row[caption_field], where, caption_field, audio_path)
    elif "question" in extra and "answer" in extra:
        captions = []  # audio QA rows are embedded as question + audio -> answer
    elif "label" in extra or "labels" in extra:
        captions = []  # classification clips are scored against the class prompts
    else:
        raise _error(where, f"missing '{caption_field}'", MISSING_FIELD, audio_path)
    return ClipRecord(id=clip_id, audio_path=audio_path, captions=captions, extra=extra, source=where)


def _add_unique(records: list[ClipRecord], seen: dict[str, str], record: ClipRecord) -> None:
    if record.id in seen:
        raise _error(
            record.source,
            f"duplicate clip id '{record.id}' (first at {seen[record.id]}); put all captions of a clip in "
            "one row's caption list, or give the rows distinct ids",
            DUPLICATE_ID,
            record.audio_path,
        )
    seen[record.id] = record.source
    records.append(record)


def _keep(
    records: list[ClipRecord],
    seen: dict[str, str],
    problems: list[SkippedSample] | None,
    build: Callable[..., ClipRecord],
    *args: Any,
) -> None:
    """Add the record ``build(*args)`` makes; a bad row raises, or goes to ``problems`` when given."""
    try:
        _add_unique(records, seen, build(*args))
    except ManifestError as err:
        if problems is None:
            raise
        problems.append(err.skipped())


def _named_value(value: Any, where: str, what: str) -> str:
    """A row's non-empty string naming its audio file (``what`` describes the field)."""
    if value is None or value == "":
        raise _error(where, f"missing {what}", MISSING_FIELD)
    if not isinstance(value, str):
        raise _error(where, f"{what} must be a string, got {value!r}", WRONG_TYPE)
    return value


def _text_pair(query: Any, document: Any, negatives: Any, clip_id: Any, where: str) -> ClipRecord:
    """A text-only pair's record (see the module docstring), its fields validated."""
    query = _text_list(query, where, "query_text", "")
    document = _text_list(document, where, "document_text", "")
    if len(query) != 1 or len(document) != 1:
        raise _error(where, "'query_text' and 'document_text' must each be one string", WRONG_TYPE)
    if not isinstance(clip_id, str) or not clip_id:
        raise _error(where, f"'id' must be a non-empty string, got {clip_id!r}", WRONG_TYPE)
    extra: dict[str, Any] = {"query_text": query[0]}
    if negatives not in (None, []):
        extra["hard_negatives"] = _text_list(negatives, where, "hard_negatives", "")
    return ClipRecord(id=clip_id, audio_path="", captions=document, extra=extra, source=where)


def _jsonl_row(line: str, where: str, base: str) -> ClipRecord:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise _error(where, f"invalid JSON ({err.msg} at column {err.colno})", INVALID_JSON) from err
    if not isinstance(row, dict):
        raise _error(where, f"a row must be a JSON object, got {type(row).__name__}", NOT_AN_OBJECT)
    if "query_text" in row or "document_text" in row:
        if "query_text" not in row or "document_text" not in row:
            raise _error(where, "a text pair needs both 'query_text' and 'document_text'", MISSING_FIELD)
        return _text_pair(row["query_text"], row["document_text"], row.get("hard_negatives"), row.get("id", where), where)
    audio = _named_value(row.get("audio"), where, "'audio' (path of the audio file)")
    audio_path = os.path.join(base, os.path.expanduser(audio))
    return _record(row, audio_path, row.get("id", audio), where, skip=("audio", "caption", "id"))


def read_jsonl(path: str, problems: list[SkippedSample] | None = None) -> list[ClipRecord]:
    """Parse a JSONL manifest (see the module docstring for the row format).

    Args:
        path: the manifest.
        problems: when given, bad rows are appended here and left out instead of raising.

    Raises:
        ManifestError: on a bad row (unless ``problems`` is given); the message gives ``path:line``.
    """
    base = os.path.dirname(os.path.abspath(path))
    records: list[ClipRecord] = []
    seen: dict[str, str] = {}
    with open_manifest(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.strip():
                _keep(records, seen, problems, _jsonl_row, line, f"{path}:{line_no}", base)
    return records


def _resolve_audio(audio_dir: str, name: str) -> str | None:
    exact = os.path.join(audio_dir, name)
    if os.path.isfile(exact):
        return exact
    for ext in AUDIO_EXTENSIONS:
        if os.path.isfile(exact + ext):
            return exact + ext
    return None


def _find_audio(audio_dir: str, names: list[str], where: str) -> str:
    """The first of ``names`` that is a file in ``audio_dir`` (or absolute), each as written or with
    one of :data:`AUDIO_EXTENSIONS` added; a ``missing_file`` error listing every name tried."""
    for name in names:
        found = _resolve_audio(audio_dir, name)
        if found is not None:
            return found
    tried = ", ".join(n + ext for n in names for ext in ("", *AUDIO_EXTENSIONS))
    raise _error(
        where, f"audio file not found in {audio_dir} (tried {tried})", MISSING_FILE, os.path.join(audio_dir, names[0])
    )


def _list_entry(row: Any, where: str, audio_dir: str) -> ClipRecord:
    if not isinstance(row, dict):
        raise _error(where, f"an entry must be a JSON object, got {type(row).__name__}", NOT_AN_OBJECT)
    name = _named_value(row.get("video_id", row.get("id")), where, "'video_id' or 'id' (name of the audio file)")
    audio_path = _find_audio(audio_dir, [name], where)
    return _record(row, audio_path, name, where, skip=("video_id", "id", "caption"))


def load_json(path: str) -> Any:
    """A whole-file JSON manifest, parsed; invalid JSON raises a :class:`ManifestError` naming the line."""
    with open_manifest(path) as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as err:
            where = f"{path}:{err.lineno}"
            raise _error(where, f"invalid JSON ({err.msg} at column {err.colno})", INVALID_JSON) from err


def read_json_list(
    path: str, audio_dir: str | None = None, problems: list[SkippedSample] | None = None
) -> list[ClipRecord]:
    """Parse an AudioCaps/Clotho style JSON list of ``{"video_id"|"id": name, "caption": [...]}``.

    Args:
        path: the JSON file.
        audio_dir: folder holding the audio files; defaults to the JSON file's folder.
        problems: when given, bad entries are appended here and left out instead of raising.

    Raises:
        ManifestError: on a file that is not a JSON list; on a bad entry (unless ``problems`` is
            given), the message giving ``path:entry N`` (N is the 0-based list index).
    """
    return json_list_records(path, load_json(path), audio_dir, problems)


def json_list_records(
    path: str, data: Any, audio_dir: str | None = None, problems: list[SkippedSample] | None = None
) -> list[ClipRecord]:
    """The records of an already parsed JSON list manifest (see :func:`read_json_list`)."""
    audio_dir = audio_dir if audio_dir is not None else os.path.dirname(os.path.abspath(path))
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise _error(path, "expected a JSON list of clip entries (or {'data': [...]})", WRONG_TYPE)
    records: list[ClipRecord] = []
    seen: dict[str, str] = {}
    for index, row in enumerate(data):
        _keep(records, seen, problems, _list_entry, row, f"{path}:entry {index}", audio_dir)
    return records


def read_manifest(
    manifest: str | ManifestSpec, audio_dir: str | None = None, problems: list[SkippedSample] | None = None
) -> list[ClipRecord]:
    """Parse a manifest in any format :mod:`datamodules.formats` reads.

    Args:
        manifest: a path, its format detected (``.jsonl`` rows, a ``.json`` list or WavCaps file, a
            ``.csv`` by its header, ``.parquet`` / ``.arrow`` files or a dataset folder), or a
            :class:`~datamodules.formats.ManifestSpec` naming the format and its options.
        audio_dir: audio folder of the formats that name files (JSON list, WavCaps, Clotho,
            AudioCaps) when the spec gives none; JSONL paths are relative to the manifest.
        problems: when given, bad rows are appended here (with their reason) and left out instead
            of raising; the good rows keep their order.

    Raises:
        ManifestError: unknown format, missing manifest, a file that does not parse as a whole,
            or (unless ``problems`` is given) a bad row.
    """
    from datamodules.formats import as_spec, read_spec  # formats builds on this module

    return read_spec(as_spec(manifest, audio_dir), problems)


def screen_audio(
    records: list[ClipRecord], problems: list[SkippedSample] | None = None
) -> tuple[list[ClipRecord], list[float]]:
    """Read every clip's audio header (no samples are decoded) and keep the clips whose audio opens.

    Finds empty files, unreadable headers, unsupported formats and headers announcing no samples;
    problems inside the samples (truncation, NaN) only show when a clip is decoded.

    Args:
        records: clips from :func:`read_manifest`.
        problems: when given, clips whose header fails are appended here and left out instead of
            raising.

    Returns:
        The kept records, in order, and their durations in seconds.

    Raises:
        AudioDecodeError: a header fails (unless ``problems`` is given); the message starts with the
            row's ``manifest:line``.
    """
    kept, durations = [], []
    for record in records:
        if record.is_text_pair:  # no audio to screen
            kept.append(record)
            durations.append(0.0)
            continue
        try:
            durations.append(audio_duration(record.audio_path))
        except AudioDecodeError as err:
            if problems is None:
                raise AudioDecodeError(f"{record.source}: {err}", err.reason, record.audio_path) from err
            problems.append(SkippedSample(err.reason, record.source, record.audio_path, str(err)))
            continue
        kept.append(record)
    return kept, durations
