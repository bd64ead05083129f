"""Mapping from audio tags to tag clusters, for the tag-cluster positives of :class:`HybridNCE`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from losses.structure import string_key


class TagClusterMap:
    """Maps tags ("dog bark", "barking") to cluster ids so that synonymous tag sets match.

    The file format is AuroLA's: a JSON object ``{tag: {"cluster_index": int | null}}``. A tag
    mapped to ``null`` is ignored (too generic to define a positive). A tag missing from the map
    keeps its own identity: it gets a cluster of its own (a negative id derived from the tag text,
    the same in every process, so it never collides with the file's non-negative ids). Two rows
    sharing an unmapped tag can still match; AuroLA instead drops unmapped tags. Tags are compared
    after stripping surrounding whitespace, as AuroLA does when it splits "a, b, c" captions.

    Args:
        clusters: tag → cluster id (non-negative), or ``None`` to ignore the tag.

    References:
        AuroLA: arXiv 2602.18010 (code: github.com/Jazzcharles/AuroLA).

    Example:
        >>> tags = TagClusterMap({"dog": 3, "barking": 3, "sound": None})
        >>> tags.clusters_for(["barking", " sound"]) == tags.clusters_for(["dog"])
        True
        >>> len(tags.clusters_for(["dog", "purring"]))
        2
    """

    def __init__(self, clusters: Mapping[str, int | None]):
        for tag, index in clusters.items():
            if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
                raise ValueError(f"cluster index of tag {tag!r} must be a non-negative int or None, got {index!r}")
        self.clusters = {tag.strip(): index for tag, index in clusters.items()}

    @classmethod
    def from_file(cls, path: str | Path) -> TagClusterMap:
        """Read AuroLA's ``{tag: {"cluster_index": int | null}}`` JSON file."""
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object of tags, got {type(raw).__name__}")
        clusters = {}
        for tag, entry in raw.items():
            if not isinstance(entry, dict) or "cluster_index" not in entry:
                raise ValueError(f"{path}: tag {tag!r} needs an object with a 'cluster_index', got {entry!r}")
            clusters[tag] = entry["cluster_index"]
        return cls(clusters)

    def clusters_for(self, tags: Iterable[str]) -> frozenset[int]:
        """The set of cluster ids of ``tags`` (empty tags and tags mapped to ``None`` are skipped)."""
        out = set()
        for tag in (t.strip() for t in tags):
            if not tag:
                continue
            if tag not in self.clusters:
                # Negative, so it cannot collide with a cluster id from the file.
                out.add(-1 - abs(string_key(tag)))
            elif self.clusters[tag] is not None:
                out.add(self.clusters[tag])
        return frozenset(out)
