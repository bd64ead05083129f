"""Annotation files as users hold them, read directly into :class:`~datamodules.manifest.ClipRecord`.

Every manifest setting of the data module (``train_manifest``, ``val_manifest``, ``test_manifest``,
``predict_manifest``, the ``manifest`` of a named evaluation set) takes either a path, whose format
is detected as below, or a :class:`ManifestSpec` mapping that names the format and its options::

    train_manifest: data/clotho/clotho_captions_development.csv   # a path: Clotho CSV by its header
    val_manifest:
      path: data/audiocaps/val.csv
      audio_dir: data/audiocaps/audio
      file_template: "Y{youtube_id}"                               # Y<youtube_id>.wav (extension optional)

``python main.py convert`` (:mod:`datamodules.convert`) writes any of them as a JSONL manifest.

Formats (``ManifestSpec.format``) and how ``auto`` recognises them:

- ``jsonl`` (``.jsonl``): one object per line, see :mod:`datamodules.manifest`.
- ``json_list`` (``.json``): a list (or ``{"data": [...]}``) of ``{"video_id" | "id": name,
  "caption": [...]}``, names in ``audio_dir``.
- ``wavcaps`` (``.json``): WavCaps' files, ``{"num_captions_per_audio": N, "data": [...]}``, each
  entry with ``id``, ``caption`` (or ``caption_1`` … ``caption_N``), ``duration`` and per source
  ``audio`` / ``wav`` (a path), ``file_name``, ``download_link``, ``href``, ``author``, ``title``,
  ``description``, ``tags``, ...; recognised by ``num_captions_per_audio`` at the top or one of
  :data:`WAVCAPS_KEYS` in the first entry (else a ``{"data": [...]}`` file is a JSON list). The
  audio file is the first that exists of: ``audio`` and ``wav`` as written (relative to
  ``audio_dir``), ``id`` (FreeSound, BBC, SoundBible: ``2219`` → ``2219.flac``), ``id`` without its
  extension (AudioSet_SL ids end in ``.wav`` while the released audio is FLAC), and the base names of
  ``audio`` and ``wav`` (paths written on another machine); or what ``file_template`` names. Every
  name may omit its extension. The clip id is ``id``, else the file's path under ``audio_dir``. The
  other fields (``duration``, ``description``, ...) are kept in :attr:`ClipRecord.extra`, so
  ``caption_fields: [caption, description]`` trains on the raw descriptions too.
- ``clotho`` (``.csv`` with ``file_name`` and ``caption_1`` … ``caption_N``): one clip per row,
  ``file_name`` in ``audio_dir``, the captions in column order, the id the file name.
- ``audiocaps`` (``.csv`` with ``youtube_id``, ``start_time`` and ``caption``; AudioCaps also has
  ``audiocap_id``): one caption per row; the rows of one ``(youtube_id, start_time)`` are one clip,
  its captions in file order, in the order the clips first appear. The clip's audio file and id are
  ``file_template`` filled from the clip's first row (default ``"{youtube_id}_{start_time}"``);
  ``youtube_id``, ``start_time`` and the list of ``audiocap_id`` are kept in ``extra``.
- ``nli`` (``.csv`` with ``sent0``, ``sent1`` and optionally ``hard_neg``): SimCSE's NLI pairs, text
  only (see :mod:`datamodules.manifest`); a row's id is its ``file:line``.
- ``hf`` (a ``.parquet`` or ``.arrow`` file, or a folder: one split saved by ``datasets``'
  ``save_to_disk``, with ``state.json`` naming its ``.arrow`` files, or a folder of parquet files,
  searched recursively, in sorted order): a table with an audio column (``audio_column``, default
  ``audio``) and caption columns (``caption_columns``, default the first of ``caption``,
  ``captions``, ``text``; each cell a string or a list of strings, the columns' texts joined in
  order). An audio cell is the ``datasets.Audio`` struct ``{"bytes", "path"}``, raw bytes or a path
  string. Bytes win: they are written once to ``audio_cache_dir`` as a file named by their SHA-256
  (so different contents never share a name and a second read writes nothing), and the clip is
  decoded from there by the same soundfile path as every other clip. Without bytes the path is
  relative to ``audio_dir``, else to the dataset's folder. The id is ``id_column`` (default ``id``
  when the table has one), else the audio's ``path``, else the row's ``file:row N``. Other columns
  holding strings, lists of strings or numbers are kept in ``extra``. Needs pyarrow (the ``hf``
  extra), imported only here.

Bad rows follow the ``on_bad_sample`` policy exactly like JSONL rows: an error naming the row
(``file:line`` for CSV, the header being line 1 and a row named by the line it starts on;
``file:entry N`` for JSON entries; ``file:row N`` for parquet / arrow rows, N counted from 0 in
each file) and its audio file, or, given a ``problems`` list, the row left out and counted by its
reason (:mod:`datamodules.bad_samples`); of rows sharing a clip id the first is kept. Problems of the
file as a whole always raise: an unknown CSV layout (the error lists the columns found and the
layouts known), a ``file_template`` naming a column the header lacks, a missing audio or caption
column, an option that does not apply to the format.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import string
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

from datamodules.bad_samples import (
    EMPTY_TEXT,
    MISSING_FIELD,
    MISSING_FILE,
    NOT_AN_OBJECT,
    UNSUPPORTED_FORMAT,
    WRONG_TYPE,
    SkippedSample,
)
from datamodules.manifest import (
    _STRING_FIELDS,
    _TEXT_LIST_FIELDS,
    ClipRecord,
    ManifestError,
    _error,
    _find_audio,
    _keep,
    _named_value,
    _record,
    _text_list,
    _text_pair,
    json_list_records,
    load_json,
    open_manifest,
    read_jsonl,
)

__all__ = [
    "DEFAULT_AUDIOCAPS_TEMPLATE",
    "DEFAULT_CAPTION_COLUMNS",
    "FORMATS",
    "ManifestSpec",
    "as_spec",
    "cache_audio_bytes",
    "default_audio_cache_dir",
    "detect_format",
    "read_csv",
    "read_hf",
    "read_spec",
    "read_wavcaps",
]

#: what ``ManifestSpec.format`` may say.
ManifestFormat = Literal["auto", "jsonl", "json_list", "clotho", "audiocaps", "wavcaps", "hf", "nli"]
FORMATS = get_args(ManifestFormat)
#: AudioCaps' audio file name (and clip id), as AuroLA names the clips.
DEFAULT_AUDIOCAPS_TEMPLATE = "{youtube_id}_{start_time}"
#: caption columns of a Hugging Face table, tried in order when ``caption_columns`` is not given.
DEFAULT_CAPTION_COLUMNS = ("caption", "captions", "text")
#: entry fields that make a ``{"data": [...]}`` JSON file WavCaps' rather than a JSON list.
WAVCAPS_KEYS = ("audio", "wav", "duration", "caption_1", "download_link", "file_name")
#: the CSV layouts, as the unknown-layout error lists them.
CSV_LAYOUTS = {
    "clotho": "file_name, caption_1 … caption_N (Clotho)",
    "audiocaps": "audiocap_id, youtube_id, start_time, caption (AudioCaps)",
    "nli": "sent0, sent1[, hard_neg] (SimCSE NLI)",
}
#: the options of a spec beyond path, format and audio_dir, and the formats each applies to.
_OPTION_FORMATS = {
    "file_template": ("audiocaps", "wavcaps"),
    "audio_column": ("hf",),
    "caption_columns": ("hf",),
    "id_column": ("hf",),
    "audio_cache_dir": ("hf",),
}
_CAPTION_COLUMN = re.compile(r"caption_(\d+)")


@dataclass
class ManifestSpec:
    """A manifest and how to read it, for annotation files a path alone does not describe (a
    ``format`` to force, the folder of the audio, the AudioCaps file-name template, the columns of
    a Hugging Face table). A plain path means ``ManifestSpec(path)``, its format detected. A spec
    stands for its path wherever a path is expected (``str(spec)``, ``os.fspath(spec)``), so
    messages, caches and reports name the file. Formats and options: :mod:`datamodules.formats`.

    Args:
        path: the annotation file; for ``hf`` also a dataset folder.
        format: ``auto`` (from the extension and the contents), ``jsonl``, ``json_list``,
            ``clotho``, ``audiocaps``, ``wavcaps``, ``hf`` or ``nli``.
        audio_dir: folder the rows' audio names are relative to (JSON list, WavCaps, Clotho,
            AudioCaps, paths of a Hugging Face table); default: the data module's ``audio_dir``,
            else the manifest's folder. JSONL paths are relative to the manifest.
        file_template: the audio file name built from a row's fields, e.g. ``"Y{youtube_id}"``
            or ``"{youtube_id}_{start_time}"`` (AudioCaps, the default there) or ``"{id}"``
            (WavCaps entries); the extension is optional (.wav .flac .ogg .mp3 are tried).
        audio_column: ``hf``: the column holding the audio (default ``audio``).
        caption_columns: ``hf``: the columns holding the captions, in order (default: the first
            of ``caption``, ``captions``, ``text`` the table has).
        id_column: ``hf``: the column holding the clip ids (default: ``id`` when the table has
            one, else the audio's path, else the row's ``file:row N``).
        audio_cache_dir: ``hf``: where audio stored as bytes is written out, once, as files named
            by their content hash (default ``$XDG_CACHE_HOME/alm-embed/hf_audio``).
    """

    path: str
    format: ManifestFormat = "auto"
    audio_dir: str | None = None
    file_template: str | None = None
    audio_column: str | None = None
    caption_columns: list[str] | None = None
    id_column: str | None = None
    audio_cache_dir: str | None = None

    def __post_init__(self) -> None:
        self.path = os.fspath(self.path)
        if self.format not in FORMATS:
            raise ValueError(f"{self.path}: unknown manifest format {self.format!r}; expected one of {FORMATS}")
        if self.file_template is not None:
            template_fields(self.file_template)
        if self.caption_columns is not None:
            if isinstance(self.caption_columns, str) or not self.caption_columns:
                raise ValueError(f"{self.path}: caption_columns must be a non-empty list of column names")
            self.caption_columns = list(self.caption_columns)

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


def as_spec(manifest: str | os.PathLike | ManifestSpec | dict, audio_dir: str | None = None) -> ManifestSpec:
    """A manifest setting as a spec (a path, a spec, or a spec's mapping); ``audio_dir`` fills a
    spec that names none (the data module's own ``audio_dir``)."""
    if isinstance(manifest, ManifestSpec):
        spec = manifest
    elif isinstance(manifest, dict):
        spec = ManifestSpec(**manifest)
    elif isinstance(manifest, (str, os.PathLike)):
        spec = ManifestSpec(os.fspath(manifest))
    else:
        raise TypeError(f"a manifest is a path or a ManifestSpec, got {type(manifest).__name__}: {manifest!r}")
    if spec.audio_dir is None and audio_dir is not None:
        spec = replace(spec, audio_dir=audio_dir)
    return spec


def template_fields(template: str) -> list[str]:
    """The column names a file-name template uses (``"Y{youtube_id}"`` → ``["youtube_id"]``).

    Raises:
        ValueError: a malformed template, a positional field, or no field at all.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"file_template {template!r}: {err}") from err
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"file_template {template!r}: fields name columns, like {{youtube_id}}; got {{{name}}}")
        names.append(name)
    if not names:
        raise ValueError(f"file_template {template!r} has no {{column}} field")
    return names


def _fill(template: str, values: dict[str, str], where: str) -> str:
    try:
        return template.format(**values)
    except (ValueError, IndexError) as err:  # a format spec the values do not take: the template's fault
        raise ValueError(f"{where}: file_template {template!r} cannot be filled from {values}: {err}") from err


def detect_format(path: str) -> str:
    """``jsonl``, ``json`` (a JSON list or WavCaps, told apart by the contents), ``csv`` (told apart
    by the header) or ``hf``, from the path alone."""
    if os.path.isdir(path):
        return "hf"
    ext = os.path.splitext(path)[1].lower()
    found = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "hf", ".arrow": "hf"}.get(ext)
    if found is None:
        raise ManifestError(
            f"{path}: unknown manifest format (expected .jsonl rows, a .json list or WavCaps file, a .csv, "
            "a .parquet / .arrow file or a dataset folder; or give its format in a ManifestSpec)",
            UNSUPPORTED_FORMAT,
            path,
        )
    return found


def _check_options(spec: ManifestSpec, fmt: str) -> None:
    for name, formats in _OPTION_FORMATS.items():
        if getattr(spec, name) is not None and fmt not in formats:
            raise ManifestError(
                f"{spec.path}: {name} applies to the {' and '.join(formats)} formats; this manifest is read as {fmt}",
                None,
                spec.path,
            )


def read_spec(spec: ManifestSpec, problems: list[SkippedSample] | None = None) -> list[ClipRecord]:
    """Parse the manifest a spec names (see the module docstring).

    Args:
        spec: the manifest, its format and options (:func:`as_spec` makes one from a path).
        problems: when given, bad rows are appended here and left out instead of raising.

    Raises:
        ManifestError: a missing manifest, an unknown format, a file that does not parse as a whole,
            or (unless ``problems`` is given) a bad row.
    """
    path = spec.path
    if not os.path.exists(path):
        raise ManifestError(f"manifest not found: {path}", MISSING_FILE, path)
    fmt = spec.format if spec.format != "auto" else detect_format(path)
    if fmt == "jsonl":
        _check_options(spec, fmt)
        return read_jsonl(path, problems)
    if fmt in ("json", "json_list", "wavcaps"):
        data = load_json(path)
        if fmt == "wavcaps" or (fmt == "json" and looks_like_wavcaps(data)):
            return read_wavcaps(spec, data, problems)
        _check_options(spec, "json_list")
        return json_list_records(path, data, spec.audio_dir, problems)
    if fmt == "hf":
        return read_hf(spec, problems)
    return read_csv(spec, problems, None if fmt == "csv" else fmt)


def _audio_dir(spec: ManifestSpec) -> str:
    if spec.audio_dir is not None:
        return spec.audio_dir
    path = os.path.abspath(spec.path)
    return path if os.path.isdir(path) else os.path.dirname(path)


def _attempt(problems: list[SkippedSample] | None, build: Callable[..., Any], *args: Any) -> Any:
    """``build(*args)``; a bad row raises, or goes to ``problems`` (giving ``None``) when given."""
    try:
        return build(*args)
    except ManifestError as err:
        if problems is None:
            raise
        problems.append(err.skipped())
        return None


# --- CSV: Clotho, AudioCaps, SimCSE NLI -----------------------------------------------------------


def _caption_columns(header: list[str]) -> list[str]:
    """``caption_1`` … ``caption_N`` of a header, in numeric order."""
    numbered = [(int(m.group(1)), name) for name in header if (m := _CAPTION_COLUMN.fullmatch(name))]
    return [name for _, name in sorted(numbered)]


_LAYOUT_TESTS: dict[str, Callable[[list[str]], bool]] = {
    "clotho": lambda header: "file_name" in header and bool(_caption_columns(header)),
    "audiocaps": lambda header: {"youtube_id", "start_time", "caption"} <= set(header),
    "nli": lambda header: {"sent0", "sent1"} <= set(header),
}


def csv_layout(header: list[str]) -> str | None:
    """The first of :data:`CSV_LAYOUTS` whose columns the header has, or ``None``."""
    return next((name for name, test in _LAYOUT_TESTS.items() if test(header)), None)


def _csv_rows(path: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header (names stripped) and ``(line the row starts on, cells)`` of every non-blank row."""
    with open_manifest(path, newline="") as handle:
        reader = csv.reader(handle)
        rows = []
        try:
            header = [name.strip() for name in next(reader, [])]
            while True:
                start = reader.line_num + 1
                cells = next(reader, None)
                if cells is None:
                    break
                if cells:  # csv.reader gives [] for a blank line
                    rows.append((start, cells))
        except csv.Error as err:
            raise ManifestError(f"{path}:{reader.line_num}: malformed CSV ({err})", None, path) from err
    return header, rows


def _cells(header: list[str], cells: list[str], where: str) -> dict[str, str | None]:
    """A row as ``{column: cell}``; cells missing at the end are ``None``."""
    if len(cells) > len(header):
        raise _error(
            where, f"the row has {len(cells)} cells, the header {len(header)} (an unquoted comma in a text?)", WRONG_TYPE
        )
    return {name: cells[i] if i < len(cells) else None for i, name in enumerate(header)}


def _cell_text(row: dict[str, str | None], column: str, where: str, path: str = "") -> str:
    value = row.get(column)
    if value is None:
        raise _error(where, f"missing '{column}' cell", MISSING_FIELD, path)
    if not value.strip():
        raise _error(where, f"empty '{column}'", EMPTY_TEXT, path)
    return value


def read_csv(
    spec: ManifestSpec | str, problems: list[SkippedSample] | None = None, layout: str | None = None
) -> list[ClipRecord]:
    """Parse a CSV manifest: Clotho, AudioCaps or SimCSE NLI, ``layout`` or else by its header.

    Raises:
        ManifestError: a header of no known layout (or not of ``layout``); a ``file_template`` naming
            a column the header lacks; a bad row (unless ``problems`` is given).
    """
    spec = as_spec(spec)
    path = spec.path
    header, rows = _csv_rows(path)
    found = layout if layout is not None and _LAYOUT_TESTS[layout](header) else csv_layout(header)
    if found is None or (layout is not None and found != layout):
        expected = [CSV_LAYOUTS[layout]] if layout is not None else list(CSV_LAYOUTS.values())
        raise ManifestError(
            f"{path}: unknown CSV layout (columns {header}); known layouts: {'; '.join(expected)}",
            UNSUPPORTED_FORMAT,
            path,
        )
    _check_options(spec, found)
    if found == "nli":
        records: list[ClipRecord] = []
        seen: dict[str, str] = {}
        for line, cells in rows:
            _keep(records, seen, problems, _nli_row, header, cells, f"{path}:{line}")
        return records
    if found == "clotho":
        return _clotho(spec, header, rows, problems)
    return _audiocaps(spec, header, rows, problems)


def _nli_row(header: list[str], cells: list[str], where: str) -> ClipRecord:
    row = _cells(header, cells, where)
    negative = (row.get("hard_neg") or "").strip()
    return _text_pair(row["sent0"], row["sent1"], [negative] if negative else None, where, where)


def _clotho(
    spec: ManifestSpec, header: list[str], rows: list[tuple[int, list[str]]], problems: list[SkippedSample] | None
) -> list[ClipRecord]:
    audio_dir, columns = _audio_dir(spec), _caption_columns(header)
    records: list[ClipRecord] = []
    seen: dict[str, str] = {}
    for line, cells in rows:
        _keep(records, seen, problems, _clotho_row, header, cells, columns, f"{spec.path}:{line}", audio_dir)
    return records


def _clotho_row(header: list[str], cells: list[str], columns: list[str], where: str, audio_dir: str) -> ClipRecord:
    row = _cells(header, cells, where)
    name = _named_value(row.get("file_name"), where, "'file_name' (name of the audio file)")
    audio_path = _find_audio(audio_dir, [name], where)
    captions = [_cell_text(row, column, where, audio_path) for column in columns]
    extra = {k: v for k, v in row.items() if k != "file_name" and k not in columns and v}
    return _record({**extra, "caption": captions}, audio_path, name, where, skip=("caption",))


def _audiocaps(
    spec: ManifestSpec, header: list[str], rows: list[tuple[int, list[str]]], problems: list[SkippedSample] | None
) -> list[ClipRecord]:
    path, audio_dir = spec.path, _audio_dir(spec)
    template = spec.file_template or DEFAULT_AUDIOCAPS_TEMPLATE
    missing = [name for name in template_fields(template) if name not in header]
    if missing:
        raise ManifestError(
            f"{path}:1: file_template {template!r} names {', '.join(map(repr, missing))}, which the header "
            f"lacks (columns {header})",
            None,
            f"{path}:1",
        )
    # The rows of one (youtube_id, start_time) are one clip, its captions in file order.
    clips: dict[tuple[str, str], dict[str, Any]] = {}
    for line, cells in rows:
        parsed = _attempt(problems, _audiocaps_row, header, cells, f"{path}:{line}")
        if parsed is not None:
            key, row, caption, where = parsed
            clip = clips.setdefault(key, {"row": row, "where": where, "captions": [], "ids": []})
            clip["captions"].append(caption)
            clip["ids"].append(row.get("audiocap_id"))
    records: list[ClipRecord] = []
    seen: dict[str, str] = {}
    for clip in clips.values():
        _keep(records, seen, problems, _audiocaps_clip, clip, template, audio_dir, "audiocap_id" in header)
    return records


def _audiocaps_row(header: list[str], cells: list[str], where: str) -> tuple[tuple[str, str], dict, str, str]:
    row = _cells(header, cells, where)
    youtube_id = _named_value(row.get("youtube_id"), where, "'youtube_id'").strip()
    start_time = _named_value(row.get("start_time"), where, "'start_time'").strip()
    return (youtube_id, start_time), row, _cell_text(row, "caption", where), where


def _audiocaps_clip(clip: dict[str, Any], template: str, audio_dir: str, with_ids: bool) -> ClipRecord:
    row, where = clip["row"], clip["where"]
    values = {}
    for name in template_fields(template):
        value = (row.get(name) or "").strip()
        if not value:
            raise _error(where, f"empty '{name}', which file_template {template!r} needs", MISSING_FIELD)
        values[name] = value
    name = _fill(template, values, where)
    audio_path = _find_audio(audio_dir, [name], where)
    extra: dict[str, Any] = {"youtube_id": row["youtube_id"].strip(), "start_time": row["start_time"].strip()}
    if with_ids:
        extra["audiocap_id"] = [(i or "").strip() for i in clip["ids"]]
    return _record({**extra, "caption": clip["captions"]}, audio_path, name, where, skip=("caption",))


# --- WavCaps JSON ---------------------------------------------------------------------------------


def looks_like_wavcaps(data: Any) -> bool:
    """Whether a parsed ``.json`` manifest is a WavCaps file (see the module docstring)."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        return False
    if "num_captions_per_audio" in data:
        return True
    first = next((entry for entry in data["data"] if isinstance(entry, dict)), None)
    return first is not None and any(key in first for key in WAVCAPS_KEYS)


def read_wavcaps(
    spec: ManifestSpec | str, data: Any = None, problems: list[SkippedSample] | None = None
) -> list[ClipRecord]:
    """Parse a WavCaps JSON file (``data``: its parsed contents, when already loaded).

    Raises:
        ManifestError: a file that is not ``{"data": [...]}``; a bad entry (unless ``problems`` is
            given), the message giving ``path:entry N`` (N is the 0-based index in ``data``).
    """
    spec = as_spec(spec)
    _check_options(spec, "wavcaps")
    path = spec.path
    data = load_json(path) if data is None else data
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise _error(path, "expected a WavCaps file, a JSON object with a 'data' list of entries", WRONG_TYPE)
    per_audio = data.get("num_captions_per_audio")
    if per_audio is not None and (isinstance(per_audio, bool) or not isinstance(per_audio, int) or per_audio < 1):
        raise _error(path, f"'num_captions_per_audio' must be a positive integer, got {per_audio!r}", WRONG_TYPE)
    audio_dir = _audio_dir(spec)
    records: list[ClipRecord] = []
    seen: dict[str, str] = {}
    for index, entry in enumerate(data["data"]):
        _keep(records, seen, problems, _wavcaps_entry, entry, f"{path}:entry {index}", audio_dir, spec.file_template,
              per_audio)  # fmt: skip
    return records


def _wavcaps_names(entry: dict[str, Any], clip_id: str | None) -> list[str]:
    """The names an entry's audio file may have, in the order they are tried."""
    paths = [entry[key] for key in ("audio", "wav") if isinstance(entry.get(key), str) and entry[key].strip()]
    ids = [clip_id, os.path.splitext(clip_id)[0]] if clip_id else []
    names = paths + ids + [os.path.basename(p) for p in paths]
    return [name for i, name in enumerate(names) if name and name not in names[:i]]


def _wavcaps_entry(
    entry: Any, where: str, audio_dir: str, template: str | None, per_audio: int | None
) -> ClipRecord:
    if not isinstance(entry, dict):
        raise _error(where, f"an entry must be a JSON object, got {type(entry).__name__}", NOT_AN_OBJECT)
    clip_id = entry.get("id")
    if isinstance(clip_id, int) and not isinstance(clip_id, bool):
        clip_id = str(clip_id)
    if clip_id is not None and not isinstance(clip_id, str):
        raise _error(where, f"'id' must be a string, got {clip_id!r}", WRONG_TYPE)
    if template is not None:
        values = {k: str(v) for k, v in entry.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)}
        missing = [name for name in template_fields(template) if not values.get(name, "").strip()]
        if missing:
            raise _error(where, f"no {', '.join(map(repr, missing))}, which file_template {template!r} needs",
                         MISSING_FIELD)  # fmt: skip
        names = [_fill(template, values, where)]
    else:
        names = _wavcaps_names(entry, clip_id)
        if not names:
            raise _error(where, "no 'id', 'audio' or 'wav' naming the audio file", MISSING_FIELD)
    audio_path = _find_audio(audio_dir, names, where)
    numbered = _caption_columns(list(entry))
    if "caption" in entry:
        captions = _text_list(entry["caption"], where, "caption", audio_path)
    else:
        expected = [f"caption_{i}" for i in range(1, per_audio + 1)] if per_audio and per_audio > 1 else numbered
        absent = [name for name in expected if name not in entry]
        if not expected or absent:
            raise _error(where, f"missing {', '.join(absent) or repr('caption')}", MISSING_FIELD, audio_path)
        captions = [text for name in expected for text in _text_list(entry[name], where, name, audio_path)]
    if not clip_id:  # the file's path under audio_dir (absolute when it lies elsewhere)
        relative = os.path.relpath(audio_path, audio_dir)
        clip_id = audio_path if relative.startswith("..") else relative
    taken = {"id", "audio", "wav", "caption", *numbered}
    extra = {k: v for k, v in entry.items() if k not in taken}
    return _record({**extra, "caption": captions}, audio_path, clip_id, where, skip=("caption",))


# --- Hugging Face datasets: parquet, arrow, save_to_disk folders -----------------------------------


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as err:  # pragma: no cover - the hf extra is installed with dev
        raise ImportError(
            "reading Hugging Face datasets (parquet files, save_to_disk folders) needs pyarrow: "
            "pip install 'alm-embed[hf]'"
        ) from err
    return pyarrow


def default_audio_cache_dir() -> str:
    """``$XDG_CACHE_HOME/alm-embed/hf_audio`` (``~/.cache/alm-embed/hf_audio`` by default): a per-user
    cache, because dataset folders are often shared and read-only."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "alm-embed", "hf_audio")


#: leading bytes of the containers libsndfile decodes, and the extension a cached file gets.
_MAGIC = ((b"RIFF", ".wav"), (b"RIFX", ".wav"), (b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"FORM", ".aiff"),
          (b"ID3", ".mp3"))  # fmt: skip


def _audio_extension(data: bytes, name: str | None) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:  # an MPEG frame without an ID3 tag
        return ".mp3"
    ext = os.path.splitext(name or "")[1].lower()
    return ext if re.fullmatch(r"\.[a-z0-9]{1,5}", ext) else ".bin"


def cache_audio_bytes(data: bytes, name: str | None, cache_dir: str) -> str:
    """The file holding ``data`` in ``cache_dir``, written now unless it is already there.

    Files are named ``<sha256[:2]>/<sha256><ext>`` (the extension from the container's leading bytes,
    else from ``name``), so different contents never share a name, and written to a temporary name
    then renamed, so concurrent readers (several ranks) never see half a file.
    """
    digest = hashlib.sha256(data).hexdigest()
    folder = os.path.join(cache_dir, digest[:2])
    path = os.path.join(folder, digest + _audio_extension(data, name))
    if os.path.isfile(path) and os.path.getsize(path) == len(data):
        return path
    os.makedirs(folder, exist_ok=True)
    handle, scratch = tempfile.mkstemp(prefix=".partial-", dir=folder)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(scratch, path)
    except BaseException:
        if os.path.exists(scratch):
            os.remove(scratch)
        raise
    return path


def hf_files(path: str) -> list[str]:
    """The data files of a Hugging Face dataset path, in row order (see the module docstring).

    Raises:
        ManifestError: a ``DatasetDict`` folder (name one split), a folder without data files, a
            ``state.json`` naming missing files or an indices mapping.
    """
    if os.path.isfile(path):
        return [path]
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as handle:
            splits = json.load(handle).get("splits", [])
        raise ManifestError(
            f"{path}: a dataset with the splits {splits}; give one split's folder, e.g. "
            f"{os.path.join(path, splits[0] if splits else 'train')}",
            UNSUPPORTED_FORMAT,
            path,
        )
    state = os.path.join(path, "state.json")
    if os.path.isfile(state):
        with open(state, encoding="utf-8") as handle:
            info = json.load(handle)
        if info.get("_indices_data_files"):
            raise ManifestError(f"{state}: the dataset holds an indices mapping; save it again after "
                                "flatten_indices()", UNSUPPORTED_FORMAT, path)  # fmt: skip
        files = [os.path.join(path, entry["filename"]) for entry in info.get("_data_files", [])]
        for file in files:
            if not os.path.isfile(file):
                raise ManifestError(f"{state} names {file}, which does not exist", MISSING_FILE, file)
    else:
        files = sorted(glob.glob(os.path.join(path, "*.arrow"))) or sorted(
            glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)
        )
    if not files:
        raise ManifestError(
            f"{path}: no data files (expected a save_to_disk folder with state.json and .arrow files, "
            "or .parquet files)",
            UNSUPPORTED_FORMAT,
            path,
        )
    return files


def _table_batches(pa: Any, file: str) -> tuple[list[str], Iterator[list[dict[str, Any]]]]:
    """The column names of a parquet or arrow file and its rows, a batch at a time."""
    try:
        if file.endswith(".parquet"):
            table = pa.parquet.ParquetFile(file)
            batches = table.iter_batches(batch_size=256)
            return list(table.schema_arrow.names), (batch.to_pylist() for batch in batches)
        source = pa.memory_map(file)
        try:
            reader = pa.ipc.open_stream(source)  # what datasets' save_to_disk writes
            return list(reader.schema.names), (batch.to_pylist() for batch in reader)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            return list(reader.schema.names), (reader.get_batch(i).to_pylist() for i in range(reader.num_record_batches))
    except (pa.ArrowInvalid, OSError) as err:
        raise ManifestError(f"{file}: not a readable parquet / arrow file ({err})", UNSUPPORTED_FORMAT, file) from err


@dataclass
class _Columns:
    audio: str
    captions: list[str]
    id: str | None


def _hf_columns(spec: ManifestSpec, file: str, names: list[str]) -> _Columns:
    audio = spec.audio_column or "audio"
    if audio not in names:
        raise ManifestError(f"{file}: no audio column '{audio}' (columns {names}); set audio_column", None, file)
    if spec.caption_columns is not None:
        absent = [name for name in spec.caption_columns if name not in names]
        if absent:
            raise ManifestError(f"{file}: no caption column {absent} (columns {names})", None, file)
        captions = spec.caption_columns
    else:
        captions = [name for name in DEFAULT_CAPTION_COLUMNS if name in names][:1]
        if not captions:
            raise ManifestError(
                f"{file}: no caption column (tried {', '.join(DEFAULT_CAPTION_COLUMNS)}; columns {names}); set "
                "caption_columns",
                None,
                file,
            )
    if spec.id_column is not None and spec.id_column not in names:
        raise ManifestError(f"{file}: no id column '{spec.id_column}' (columns {names})", None, file)
    return _Columns(audio, captions, spec.id_column or ("id" if "id" in names else None))


def read_hf(spec: ManifestSpec | str, problems: list[SkippedSample] | None = None) -> list[ClipRecord]:
    """Parse a Hugging Face dataset: a parquet or arrow file, or a folder (see the module docstring).

    Raises:
        ManifestError: no data files, a file pyarrow cannot read, a missing audio, caption or id
            column; a bad row (unless ``problems`` is given), the message giving ``file:row N``.
        ImportError: pyarrow is not installed (``pip install 'alm-embed[hf]'``).
    """
    spec = as_spec(spec)
    _check_options(spec, "hf")
    pa = _pyarrow()
    audio_dir = _audio_dir(spec)
    cache_dir = spec.audio_cache_dir or default_audio_cache_dir()
    records: list[ClipRecord] = []
    seen: dict[str, str] = {}
    for file in hf_files(spec.path):
        names, batches = _table_batches(pa, file)
        columns = _hf_columns(spec, file, names)
        index = 0
        for batch in batches:
            for row in batch:
                _keep(records, seen, problems, _hf_row, row, f"{file}:row {index}", columns, audio_dir, cache_dir)
                index += 1
    return records


#: extra fields the manifest checks as texts; numbers there (a ``ClassLabel`` index) are left out.
_TEXT_FIELDS = frozenset((*_STRING_FIELDS, *_TEXT_LIST_FIELDS, "tags"))


def _plain_value(name: str, value: Any) -> bool:
    """Whether a cell is kept in ``extra``: a string, a list of strings, or a number of a non-text field."""
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, str) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and name not in _TEXT_FIELDS


def _hf_row(row: dict[str, Any], where: str, columns: _Columns, audio_dir: str, cache_dir: str) -> ClipRecord:
    value = row.get(columns.audio)
    data, name = None, None
    if isinstance(value, dict):
        data, name = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data = value
    elif isinstance(value, str):
        name = value
    elif value is not None:
        raise _error(where, f"'{columns.audio}' must hold audio bytes, a path or {{bytes, path}}, got "
                            f"{type(value).__name__}", WRONG_TYPE)  # fmt: skip
    if name is not None and not isinstance(name, str):
        raise _error(where, f"'{columns.audio}' path must be a string, got {name!r}", WRONG_TYPE)
    if data is not None and (data or not name):  # bytes win; an empty value is an empty file
        audio_path = cache_audio_bytes(bytes(data), name, cache_dir)
    elif name:
        audio_path = _find_audio(audio_dir, [name], where)
    else:
        raise _error(where, f"'{columns.audio}' holds neither bytes nor a path", MISSING_FIELD)
    captions: list[str] = []
    for column in columns.captions:
        if row.get(column) is None:
            raise _error(where, f"'{column}' is null", MISSING_FIELD, audio_path)
        captions += _text_list(row[column], where, column, audio_path)
    if columns.id is not None:
        clip_id = row.get(columns.id)
        if isinstance(clip_id, int) and not isinstance(clip_id, bool):
            clip_id = str(clip_id)
        if clip_id is None or clip_id == "":
            raise _error(where, f"'{columns.id}' is empty", MISSING_FIELD, audio_path)
    else:
        clip_id = name or where
    taken = {columns.audio, *columns.captions, columns.id}
    extra = {k: v for k, v in row.items() if k not in taken and _plain_value(k, v)}
    return _record({**extra, "caption": captions}, audio_path, clip_id, where, skip=("caption",))
