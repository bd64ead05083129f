"""Reading clip lists: JSONL manifests and the AudioCaps/Clotho JSON list format.

Every problem is reported as a :class:`ManifestError` naming the manifest, the line (or list
entry) and, where relevant, the audio file, and audio files are checked for existence while
parsing, so a broken row fails before training starts rather than hours into it.

JSONL: one object per line, blank lines skipped::

    {"audio": "wav/a.wav", "caption": ["a dog barks", "barking"], "id": "a", "tags": "dog, bark"}
    {"audio": "/abs/b.flac", "question": "What animal?", "answer": "a dog", "choices": ["dog", "cat"]}

``audio`` is relative to the manifest's folder unless absolute. ``caption`` is a string or a list of
strings; rows with ``question`` and ``answer`` (audio QA) may omit it. Without ``id`` the clip id is
the ``audio`` value as written. Other fields are kept in :attr:`ClipRecord.extra`; ``tags`` given as
a comma-separated string is split into a list.

JSON list (as AuroLA/WavCaps ship AudioCaps and Clotho)::

    [{"video_id": "Y7fmOlUlwoNg", "caption": ["...", "...", "...", "...", "..."]}, ...]

``video_id`` (or ``id``) names a file in ``audio_dir``; when no file has exactly that name, the
extensions .wav .flac .ogg .mp3 are tried in turn. A top-level ``{"data": [...]}`` is accepted too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AUDIO_EXTENSIONS", "ClipRecord", "ManifestError", "read_json_list", "read_jsonl", "read_manifest"]

#: extensions tried, in order, when a JSON-list entry names its audio without one.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")

#: extra fields that, when present, must hold a string or a non-empty list of strings.
_TEXT_LIST_FIELDS = ("caption_long", "caption_short", "choices")
#: extra fields that, when present, must hold one non-empty string.
_STRING_FIELDS = ("instruction", "question", "answer")


class ManifestError(ValueError):
    """A manifest row is malformed or points at a missing audio file."""


@dataclass
class ClipRecord:
    """One audio clip and its texts, as read from a manifest.

    Attributes:
        id: unique clip id within the manifest.
        audio_path: resolved path of the audio file.
        captions: the clip's captions (empty only for audio QA rows).
        extra: every other field of the row (``tags`` normalised to a list of strings).
        source: ``"manifest:line"`` (or ``"manifest:entry N"``), for error messages.
    """

    id: str
    audio_path: str
    captions: list[str]
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def is_qa(self) -> bool:
        """``True`` for audio question-answering rows (they carry ``question`` and ``answer``)."""
        return "question" in self.extra and "answer" in self.extra

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


def _error(where: str, message: str) -> ManifestError:
    return ManifestError(f"{where}: {message}")


def _text_list(value: Any, where: str, name: str) -> list[str]:
    """A string or a non-empty list of non-empty strings, as a list."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise _error(where, f"'{name}' must be a non-empty string or a non-empty list of strings, got {value!r}")
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise _error(where, f"'{name}' entries must be non-empty strings, got {item!r}")
    return list(items)


def _tag_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [tag.strip() for tag in value.split(",") if tag.strip()]
    if not isinstance(value, list) or not all(isinstance(tag, str) for tag in value):
        raise _error(where, f"'tags' must be a list of strings or a comma-separated string, got {value!r}")
    return [tag.strip() for tag in value if tag.strip()]


def _record(row: Any, audio_path: str, clip_id: Any, where: str, skip: tuple[str, ...]) -> ClipRecord:
    """Validate the text fields of one row and build its record (``row`` is a parsed JSON value)."""
    if not os.path.isfile(audio_path):
        raise _error(where, f"audio file not found: {audio_path}")
    if not isinstance(clip_id, str) or not clip_id:
        raise _error(where, f"clip id must be a non-empty string, got {clip_id!r}")
    extra = {key: value for key, value in row.items() if key not in skip}
    for name in _STRING_FIELDS:
        if name in extra and (not isinstance(extra[name], str) or not extra[name].strip()):
            raise _error(where, f"'{name}' must be a non-empty string, got {extra[name]!r}")
    for name in _TEXT_LIST_FIELDS:
        if name in extra:
            _text_list(extra[name], where, name)
    if "tags" in extra:
        extra["tags"] = _tag_list(extra["tags"], where)
    if "caption" in row:
        captions = _text_list(row["caption"], where, "caption")
    elif "question" in extra and "answer" in extra:
        captions = []  # audio QA rows are embedded as question + audio -> answer
    else:
        raise _error(where, f"missing 'caption' (audio {audio_path})")
    return ClipRecord(id=clip_id, audio_path=audio_path, captions=captions, extra=extra, source=where)


def _add_unique(records: list[ClipRecord], seen: dict[str, str], record: ClipRecord) -> None:
    if record.id in seen:
        raise _error(
            record.source,
            f"duplicate clip id '{record.id}' (first at {seen[record.id]}); put all captions of a clip in "
            "one row's caption list, or give the rows distinct ids",
        )
    seen[record.id] = record.source
    records.append(record)


def read_jsonl(path: str) -> list[ClipRecord]:
    """Parse a JSONL manifest (see the module docstring for the row format).

    Raises:
        ManifestError: on a bad row; the message gives ``path:line``.
    """
    base = os.path.dirname(os.path.abspath(path))
    records: list[ClipRecord] = []
    seen: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise _error(where, f"invalid JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(row, dict):
                raise _error(where, f"a row must be a JSON object, got {type(row).__name__}")
            audio = row.get("audio")
            if not isinstance(audio, str) or not audio:
                raise _error(where, "missing 'audio' (path of the audio file)")
            audio_path = os.path.join(base, os.path.expanduser(audio))
            clip_id = row.get("id", audio)
            _add_unique(records, seen, _record(row, audio_path, clip_id, where, skip=("audio", "caption", "id")))
    return records


def _resolve_audio(audio_dir: str, name: str) -> str | None:
    exact = os.path.join(audio_dir, name)
    if os.path.isfile(exact):
        return exact
    for ext in AUDIO_EXTENSIONS:
        if os.path.isfile(exact + ext):
            return exact + ext
    return None


def read_json_list(path: str, audio_dir: str | None = None) -> list[ClipRecord]:
    """Parse an AudioCaps/Clotho style JSON list of ``{"video_id"|"id": name, "caption": [...]}``.

    Args:
        path: the JSON file.
        audio_dir: folder holding the audio files; defaults to the JSON file's folder.

    Raises:
        ManifestError: on a bad entry; the message gives ``path:entry N`` (N is the 0-based list index).
    """
    audio_dir = audio_dir if audio_dir is not None else os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as err:
            raise _error(f"{path}:{err.lineno}", f"invalid JSON ({err.msg} at column {err.colno})") from err
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise _error(path, "expected a JSON list of clip entries (or {'data': [...]})")
    records: list[ClipRecord] = []
    seen: dict[str, str] = {}
    for index, row in enumerate(data):
        where = f"{path}:entry {index}"
        if not isinstance(row, dict):
            raise _error(where, f"an entry must be a JSON object, got {type(row).__name__}")
        name = row.get("video_id", row.get("id"))
        if not isinstance(name, str) or not name:
            raise _error(where, "missing 'video_id' or 'id' (name of the audio file)")
        audio_path = _resolve_audio(audio_dir, name)
        if audio_path is None:
            tried = ", ".join([name] + [name + ext for ext in AUDIO_EXTENSIONS])
            raise _error(where, f"audio file not found in {audio_dir} (tried {tried})")
        _add_unique(records, seen, _record(row, audio_path, name, where, skip=("video_id", "id", "caption")))
    return records


def read_manifest(path: str, audio_dir: str | None = None) -> list[ClipRecord]:
    """Parse a manifest, choosing the format by extension: ``.jsonl`` rows or a ``.json`` list.

    Args:
        path: the manifest file.
        audio_dir: audio folder for the JSON list format (ignored for JSONL, whose paths are
            relative to the manifest).

    Raises:
        ManifestError: unknown extension, missing manifest, or a bad row.
    """
    if not os.path.isfile(path):
        raise ManifestError(f"manifest not found: {path}")
    if path.endswith(".jsonl"):
        return read_jsonl(path)
    if path.endswith(".json"):
        return read_json_list(path, audio_dir)
    raise ManifestError(f"{path}: unknown manifest format (expected .jsonl rows or a .json list)")
