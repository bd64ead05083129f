"""What counts as a bad sample, and what happens to one.

Real corpora hold broken rows and broken audio. The data module's ``on_bad_sample`` policy decides
what happens to them:

- ``"error"`` (default): stop with a :class:`~datamodules.manifest.ManifestError` or
  :class:`~datamodules.audio.AudioDecodeError` naming the manifest, the line (or JSON-list entry)
  and the audio file.
- ``"skip"``: drop the sample and count it under its reason. A dropped sample is never replaced
  by another one: the batch it would have been in is smaller. The counts are logged (see
  :class:`callbacks.SkippedSampleReport`).

Reasons (each bad sample gets exactly one, the first problem found):

Manifest rows (found while parsing, see :mod:`datamodules.manifest`):

- ``invalid_json``: the line (or the JSON-list file) is not valid JSON.
- ``not_an_object``: the row is valid JSON but not an object.
- ``missing_field``: no ``audio`` (JSONL) / ``video_id`` or ``id`` (JSON list), or no ``caption``
  on a row that is not an audio-QA row; an empty ``audio`` or ``id`` string counts as missing.
- ``wrong_type``: a field holds the wrong JSON type (caption as a number, tags as an object, ...).
- ``empty_text``: a text field (caption, caption list entry, question, answer, ...) is empty or
  blank, or a caption list is empty.
- ``missing_file``: the audio file does not exist.
- ``duplicate_id``: the clip id was used by an earlier row; the first row is kept.

Audio files (headers are read when the data module sets up; the rest when a clip is loaded):

- ``empty_file``: the file has zero bytes.
- ``unreadable_header``: a format libsndfile knows, but its header is corrupt.
- ``unsupported_format``: a container or codec libsndfile cannot decode (``.m4a``, ``.aac``, ...).
- ``no_samples``: a valid header announcing zero frames.
- ``decode_error``: the samples cannot be decoded, e.g. a truncated FLAC.
- ``non_finite``: the decoded samples hold NaN or infinity.

WebDataset shards (see :mod:`datamodules.shards`; a sample's JSON member is checked like a manifest
row, its audio member like an audio file):

- ``missing_member``: a sample (the tar members sharing one key) has no audio member or no ``.json``
  member, or a member name has no extension.
- ``unreadable_shard``: the tar cannot be opened or read (missing, not a tar, truncated); under
  ``skip`` each sample of the shard that could not be read counts once (when the shard's count comes
  from a scan instead of an index, the scan stops at the failure and it counts once).

Not bad: an all-silent clip and a very short clip (even a few milliseconds) are valid audio. Short
clips are zero-padded by the backbone's collator to the length its audio encoder needs;
``python main.py check-data`` lists clips under :data:`SHORT_CLIP_SECONDS` as warnings. Nor a very
long text: it is cut to the backbone's ``max_text_tokens`` and counted apart (see
:mod:`datamodules.text_limits`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "AUDIO_REASONS",
    "MANIFEST_REASONS",
    "REASONS",
    "SHARD_REASONS",
    "SHORT_CLIP_SECONDS",
    "BadSamplePolicy",
    "SkippedSample",
    "count_reasons",
    "format_counts",
]

#: what the data module does with a bad sample (see the module docstring).
BadSamplePolicy = Literal["error", "skip"]

INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_TEXT = "empty_text"
MISSING_FILE = "missing_file"
DUPLICATE_ID = "duplicate_id"
EMPTY_FILE = "empty_file"
UNREADABLE_HEADER = "unreadable_header"
UNSUPPORTED_FORMAT = "unsupported_format"
NO_SAMPLES = "no_samples"
DECODE_ERROR = "decode_error"
NON_FINITE = "non_finite"
MISSING_MEMBER = "missing_member"
UNREADABLE_SHARD = "unreadable_shard"

#: reasons a manifest row is rejected for.
MANIFEST_REASONS = (INVALID_JSON, NOT_AN_OBJECT, MISSING_FIELD, WRONG_TYPE, EMPTY_TEXT, MISSING_FILE, DUPLICATE_ID)
#: reasons an audio file is rejected for.
AUDIO_REASONS = (EMPTY_FILE, UNREADABLE_HEADER, UNSUPPORTED_FORMAT, NO_SAMPLES, DECODE_ERROR, NON_FINITE)
#: reasons a WebDataset sample or shard is rejected for (besides those of its JSON and its audio).
SHARD_REASONS = (MISSING_MEMBER, UNREADABLE_SHARD)
#: every reason, in a fixed order (the order of reports and of the all-reduced count vector).
REASONS = MANIFEST_REASONS + AUDIO_REASONS + SHARD_REASONS

#: clips shorter than this (seconds) are valid but listed as warnings by ``check-data``.
SHORT_CLIP_SECONDS = 0.1


@dataclass(frozen=True)
class SkippedSample:
    """A sample dropped under the ``skip`` policy (also what a dataset returns in its place).

    Attributes:
        reason: one of :data:`REASONS`.
        source: ``"manifest:line"`` or ``"manifest:entry N"`` of the row (``"shard:key"`` of a
            WebDataset sample).
        path: the audio file, when known.
        detail: the full error message.
    """

    reason: str
    source: str
    path: str = ""
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown bad-sample reason {self.reason!r}; expected one of {REASONS}")


def count_reasons(samples: Iterable[SkippedSample]) -> Counter:
    """How many samples were skipped for each reason."""
    return Counter(sample.reason for sample in samples)


def format_counts(counts: dict[str, int]) -> str:
    """``"2 missing_file, 1 decode_error"`` in :data:`REASONS` order (``"none"`` when empty)."""
    parts = [f"{counts[reason]} {reason}" for reason in REASONS if counts.get(reason)]
    return ", ".join(parts) if parts else "none"
