"""Reading mined hard negatives (``python main.py mine``): per clip, its nearest other clips and captions."""

from __future__ import annotations

import json
from dataclasses import dataclass

from datamodules.manifest import ManifestError


@dataclass
class MinedNegatives:
    """One clip's mined neighbours, best first: ``audio`` = (clip id, score), ``text`` = (caption id,
    caption, score)."""

    audio: list[tuple[str, float]]
    text: list[tuple[str, str, float]]


def read_mined(path: str, clip_ids: list[str]) -> dict[str, MinedNegatives]:
    """The mined file as ``{clip id: MinedNegatives}``; every id must be one of ``clip_ids``."""
    known = set(clip_ids)
    out: dict[str, MinedNegatives] = {}
    with open(path, encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
                clip = row["id"]
                audio = [(n["id"], float(n["score"])) for n in row["audio"]]
                text = [(n["id"], n["text"], float(n["score"])) for n in row["text"]]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ManifestError(f"{where}: not a mined-negatives row ({err})") from err
            unknown = [c for c in [clip, *(a for a, _ in audio), *(t.rsplit("#", 1)[0] for t, _, _ in text)]
                       if c not in known]
            if unknown:
                raise ManifestError(f"{where}: clip id {unknown[0]!r} is not in the training manifest")
            out[clip] = MinedNegatives(audio, text)
    return out
