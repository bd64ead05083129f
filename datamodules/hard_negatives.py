"""Reading the hard negatives mined for the re-ranker (``python main.py mine``).

The file is JSON lines, one clip per line, each list best first::

    {"id": "clip_7",
     "audio": [{"id": "clip_3", "score": 0.53}, ...],
     "text": [{"id": "clip_9#2", "clip": "clip_9", "text": "a dog barks", "score": 0.48}, ...]}

``audio`` are the clips whose audio is nearest to this clip's audio, ``text`` the captions of other
clips nearest to it (``id`` is ``<clip id>#<caption index>``), with their cosine similarities under
the embedding model that mined them (AuroLA's hard negatives, DESIGN.md section 7). A clip never
lists itself. Every problem is an error naming the file and line: a re-ranker must not train on
negatives that do not belong to its data, nor fall back to random ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.bad_samples import INVALID_JSON, MISSING_FIELD, NOT_AN_OBJECT, WRONG_TYPE
from datamodules.manifest import ManifestError

__all__ = ["MinedNegatives", "read_mined"]


@dataclass
class MinedNegatives:
    """The mined neighbours of one clip, best first.

    Attributes:
        audio: ``(clip id, score)`` of the nearest other clips by audio.
        text: ``(caption id, caption, score)`` of the nearest captions of other clips.
    """

    audio: list[tuple[str, float]] = field(default_factory=list)
    text: list[tuple[str, str, float]] = field(default_factory=list)


def read_mined(path: str | Path, clip_ids: Iterable[str]) -> dict[str, MinedNegatives]:
    """The negatives of every clip in a mined file, by clip id (clips without a line are absent).

    Args:
        path: JSON lines written by ``python main.py mine``.
        clip_ids: the clips of the data set the negatives are for; every clip named in the file
            (the line's own and every negative's) must be one of them.

    Raises:
        ManifestError: with ``path:line``, for a line that is not valid JSON or not an object, a
            missing or mistyped field, a clip id or negative not in ``clip_ids``, a clip listed
            twice, or a clip listed among its own negatives.
    """
    known = set(clip_ids)
    mined: dict[str, MinedNegatives] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            source = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ManifestError(f"{source}: invalid JSON ({err.msg})", INVALID_JSON, source) from None
            if not isinstance(row, dict):
                raise ManifestError(f"{source}: expected a JSON object, got {type(row).__name__}", NOT_AN_OBJECT, source)
            clip = _field(row, "id", str, source)
            if clip not in known:
                raise ManifestError(f"{source}: clip '{clip}' is not in the data set", None, source)
            if clip in mined:
                raise ManifestError(f"{source}: clip '{clip}' is listed a second time", None, source)
            audio = []
            for entry in _entries(row, "audio", source):
                neighbour = _neighbour(_field(entry, "id", str, source), clip, known, source, "audio")
                audio.append((neighbour, _score(entry, source)))
            text = []
            for entry in _entries(row, "text", source):
                caption_id = _field(entry, "id", str, source)
                owner = _neighbour(_field(entry, "clip", str, source), clip, known, source, "text")
                prefix, _, index = caption_id.rpartition("#")
                if prefix != owner or not index.isdigit():
                    raise ManifestError(
                        f"{source}: text negative '{caption_id}' is not '<clip id>#<caption index>' of its clip '{owner}'",
                        WRONG_TYPE, source,
                    )
                text.append((caption_id, _field(entry, "text", str, source), _score(entry, source)))
            mined[clip] = MinedNegatives(audio, text)
    return mined


def _field(row: dict[str, Any], name: str, kind: type, source: str) -> Any:
    if name not in row:
        raise ManifestError(f"{source}: no '{name}' field", MISSING_FIELD, source)
    value = row[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ManifestError(f"{source}: '{name}' must be a {kind.__name__}, got {value!r}", WRONG_TYPE, source)
    return value


def _entries(row: dict[str, Any], side: str, source: str) -> list[dict[str, Any]]:
    entries = _field(row, side, list, source)
    for entry in entries:
        if not isinstance(entry, dict):
            raise ManifestError(f"{source}: '{side}' entries must be objects, got {entry!r}", WRONG_TYPE, source)
    return entries


def _neighbour(neighbour: str, clip: str, known: set[str], source: str, side: str) -> str:
    if neighbour not in known:
        raise ManifestError(f"{source}: {side} negative of clip '{clip}' names clip '{neighbour}', which is not in the "
                            "data set", None, source)
    if neighbour == clip:
        raise ManifestError(f"{source}: clip '{clip}' is listed among its own {side} negatives", None, source)
    return neighbour


def _score(entry: dict[str, Any], source: str) -> float:
    score = entry.get("score")
    if "score" not in entry:
        raise ManifestError(f"{source}: a negative has no 'score' field", MISSING_FIELD, source)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise ManifestError(f"{source}: 'score' must be a finite number, got {score!r}", WRONG_TYPE, source)
    return float(score)
