"""``python main.py shard``: write any manifest as WebDataset shards, with an index of their counts.

    python main.py shard --manifest data/train.jsonl --output_dir data/shards [--max_size 1GB | --max_count N] [--prefix train]
    python main.py shard --index_shards "data/laion/{000000..000099}.tar"     # only the index, for shards made elsewhere

Every clip of the manifest (JSONL, a JSON list with ``--audio_dir``; see
:mod:`datamodules.manifest`) becomes one sample of the format :mod:`datamodules.shards` reads:
``<key>.<ext>``, the audio file's bytes as they are (not re-encoded), and ``<key>.json`` with
``text`` (the captions), ``id`` (the clip id), ``duration`` (seconds, from the audio header) and the
row's other fields. The key is the clip id made tar-safe: characters other than letters, digits,
``_`` and ``-`` become ``_`` (a key must hold no dot: the reader splits member names at the first
one), long ids are cut and given a hash, and a key already used gets a ``_<n>`` suffix; the JSON's
``id`` keeps the original id.

Shards are ``<prefix>-000000.tar``, ``<prefix>-000001.tar``, ... in ``--output_dir``, each closed
before it would pass ``--max_size`` bytes (tar headers and end-of-archive padding included; a clip
larger than that gets a shard of its own) or hold ``--max_count`` samples. Rows are shuffled first
(``--seed``; ``--keep_order`` keeps the manifest's order), because a reader's shuffle buffer only
mixes samples that are close in the shards. ``index.json`` beside them lists each shard's file name,
sample count and size; the reader takes its counts from there instead of reading every shard. The
command prints the brace pattern to give as ``train_shards``.

Bad rows and audio headers stop the command with the manifest's error (``--on_bad_sample skip``
leaves them out and counts them, as training does); text-only pairs have no audio to shard. Tar
headers are written with fixed times and owners, so the same manifest and seed give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import soundfile as sf

from datamodules.bad_samples import WRONG_TYPE, SkippedSample, count_reasons, format_counts
from datamodules.manifest import ClipRecord, ManifestError, read_manifest, screen_audio
from datamodules.shards import AUDIO_MEMBER_EXTENSIONS, INDEX_NAME, count_shards, expand_shards

__all__ = ["main", "parse_size", "shard_key", "write_index", "write_shards"]

_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}  # fmt: skip
_MAX_KEY = 64


def parse_size(text: str) -> int:
    """Bytes of ``"1GB"``, ``"500 MB"``, ``"2GiB"``, ``"1e9"`` (decimal units; ``KiB``... binary)."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 1GB, 500MB, 2GiB, 1e9)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return size


def shard_key(clip_id: str, used: set[str]) -> str:
    """A tar-safe key for ``clip_id`` not in ``used`` (which it is added to); see the module docstring."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", clip_id) or "_"
    if len(key) > _MAX_KEY:
        key = f"{key[: _MAX_KEY - 17]}_{hashlib.sha1(clip_id.encode('utf-8')).hexdigest()[:16]}"
    unique, n = key, 1
    while unique in used:
        unique, n = f"{key}_{n}", n + 1
    used.add(unique)
    return unique


def _extension(path: str) -> str:
    """The audio member's extension: the file's own, or its format's when it has none we know."""
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if ext in AUDIO_MEMBER_EXTENSIONS:
        return ext
    return {"mpeg": "mp3"}.get(sf.info(path).format.lower(), sf.info(path).format.lower())


def _sample_json(record: ClipRecord, duration: float) -> dict[str, Any]:
    if "text" in record.extra:
        raise ManifestError(f"{record.source}: a field 'text' would take the place of the captions in the shard "
                            "sample; rename it", WRONG_TYPE, record.source, record.audio_path)  # fmt: skip
    row: dict[str, Any] = {}
    if record.captions:
        row["text"] = record.captions
    row["id"] = record.id
    row.update({name: value for name, value in record.extra.items() if name != "duration"})
    row["duration"] = round(float(duration), 6)
    return row


def _member_bytes(size: int) -> int:
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def _archive_bytes(members: int) -> int:
    """Size of a tar file whose members take ``members`` bytes: two end blocks, padded to a record."""
    return -(-(members + 2 * _BLOCK) // _RECORD) * _RECORD


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    records: Sequence[ClipRecord],
    durations: Sequence[float],
    output_dir: str,
    prefix: str = "train",
    max_size: int | None = 10**9,
    max_count: int | None = None,
) -> list[dict[str, Any]]:
    """Write the clips as shards (see the module docstring), in the order given; one index entry
    ``{"url", "samples", "bytes"}`` per shard written.

    Raises:
        ManifestError: a row has a field ``text`` besides its captions.
    """
    os.makedirs(output_dir, exist_ok=True)
    entries: list[dict[str, Any]] = []
    used: set[str] = set()
    tar, members, samples = None, 0, 0

    def close() -> None:
        tar.close()
        entries[-1].update(samples=samples, bytes=os.path.getsize(os.path.join(output_dir, entries[-1]["url"])))

    for record, duration in zip(records, durations):
        key = shard_key(record.id, used)
        with open(record.audio_path, "rb") as handle:
            audio = handle.read()
        meta = json.dumps(_sample_json(record, duration), ensure_ascii=False).encode("utf-8")
        ext = _extension(record.audio_path)
        size = _member_bytes(len(audio)) + _member_bytes(len(meta))
        full = max_count is not None and samples >= max_count
        too_big = max_size is not None and _archive_bytes(members + size) > max_size
        if tar is not None and samples and (full or too_big):
            close()
            tar = None
        if tar is None:
            entries.append({"url": f"{prefix}-{len(entries):06d}.tar"})
            tar = tarfile.open(os.path.join(output_dir, entries[-1]["url"]), "w", format=tarfile.USTAR_FORMAT)
            members, samples = 0, 0
        _add(tar, f"{key}.{ext}", audio)
        _add(tar, f"{key}.json", meta)
        members, samples = members + size, samples + 1
    if tar is not None:
        close()
    return entries


def brace_pattern(folder: str, names: Sequence[str]) -> str:
    """The brace pattern of ``<prefix>-000000.tar`` ... ``<prefix>-<last>.tar`` in ``folder``."""
    first, last = names[0], names[-1]
    prefix, start = first.rsplit("-", 1)
    return os.path.join(folder, f"{prefix}-{{{start[:-4]}..{last.rsplit('-', 1)[1][:-4]}}}.tar")


def write_index(path: str, entries: list[dict[str, Any]], **about: Any) -> dict[str, Any]:
    """Write ``index.json``: ``about`` (source, pattern, skipped, ...), the totals and the entries."""
    index = {**about, "samples": sum(e["samples"] for e in entries),
             "bytes": sum(e.get("bytes") or 0 for e in entries), "shards": entries}  # fmt: skip
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(index, handle, indent=1)
        handle.write("\n")
    return index


def _index_existing(pattern: str, output: str | None) -> int:
    urls = expand_shards(pattern)
    local = not re.match(r"^[a-z][a-z0-9+.-]*:", urls[0])
    if output is None:
        if not local:
            raise SystemExit("--index_output is needed for shards that are not local files")
        output = os.path.join(os.path.dirname(os.path.abspath(urls[0])), INDEX_NAME)
    folder = os.path.dirname(os.path.abspath(output))
    entries = []
    for shard in count_shards(urls, None):
        url, size = shard.url, None
        if not re.match(r"^[a-z][a-z0-9+.-]*:", url):
            size = os.path.getsize(url)
            relative = os.path.relpath(os.path.abspath(url), folder)
            url = relative if not relative.startswith("..") else os.path.abspath(url)
        entries.append({"url": url, "samples": shard.samples, "bytes": size})
    index = write_index(output, entries, pattern=pattern)
    print(f"indexed {index['samples']} samples in {len(entries)} shards: {output}")
    return 0


def main(args: list[str] | None = None) -> int:
    """Run ``python main.py shard``; the exit status."""
    parser = argparse.ArgumentParser(
        prog="main.py shard", description="Write a manifest as WebDataset shards with an index.json of their counts."
    )
    parser.add_argument("--manifest", help="the manifest to shard (.jsonl, or a .json list with --audio_dir)")
    parser.add_argument("--audio_dir", help="audio folder of a .json list manifest")
    parser.add_argument("--output_dir", help="folder of the shards and their index.json")
    parser.add_argument("--prefix", default="train", help="shard file names: <prefix>-000000.tar, ...")
    parser.add_argument("--max_size", default="1GB", help="largest shard (1GB, 500MB, 2GiB, ...; 'none': no limit)")
    parser.add_argument("--max_count", type=int, help="most samples per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the row shuffle")
    parser.add_argument("--keep_order", action="store_true", help="keep the manifest's order instead of shuffling")
    parser.add_argument("--on_bad_sample", choices=["error", "skip"], default="error",
                        help="a bad row or audio header stops the command (error) or is left out and counted (skip)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards of the same prefix in output_dir")
    parser.add_argument("--index_shards", metavar="PATTERN",
                        help="only write index.json for existing shards (a brace pattern); reads every shard")
    parser.add_argument("--index_output", help="where --index_shards writes the index (default: beside the shards)")
    opts = parser.parse_args(args)
    if opts.index_shards:
        return _index_existing(opts.index_shards, opts.index_output)
    if not opts.manifest or not opts.output_dir:
        parser.error("--manifest and --output_dir are required (or --index_shards)")
    max_size = None if opts.max_size.lower() == "none" else parse_size(opts.max_size)
    if opts.max_count is not None and opts.max_count < 1:
        parser.error("--max_count must be >= 1")
    if not re.fullmatch(r"[A-Za-z0-9_]+", opts.prefix):
        parser.error("--prefix may hold letters, digits and _ only")
    existing = [n for n in os.listdir(opts.output_dir) if re.fullmatch(rf"{opts.prefix}-\d{{6}}\.tar", n)] \
        if os.path.isdir(opts.output_dir) else []  # fmt: skip
    if existing and not opts.overwrite:
        parser.error(f"{opts.output_dir} already holds {len(existing)} {opts.prefix}-*.tar shards; --overwrite replaces them")
    for name in existing:
        os.remove(os.path.join(opts.output_dir, name))

    problems: list[SkippedSample] | None = [] if opts.on_bad_sample == "skip" else None
    records = read_manifest(opts.manifest, opts.audio_dir, problems)
    pairs = [r.source for r in records if r.is_text_pair]
    if pairs:
        raise ManifestError(f"{pairs[0]}: text pairs have no audio to put in shards; train on their manifest")
    records, durations = screen_audio(records, problems)
    if not records:
        raise ManifestError(f"{opts.manifest}: no clip to shard")
    order = np.arange(len(records)) if opts.keep_order else np.random.default_rng(opts.seed).permutation(len(records))
    records, durations = [records[i] for i in order], [durations[i] for i in order]
    entries = write_shards(records, durations, opts.output_dir, opts.prefix, max_size, opts.max_count)
    pattern = brace_pattern(opts.output_dir, [e["url"] for e in entries])
    skipped = dict(count_reasons(problems or []))
    index_path = os.path.join(opts.output_dir, INDEX_NAME)
    index = write_index(index_path, entries, manifest=os.path.abspath(opts.manifest), pattern=os.path.basename(pattern),
                        seed=None if opts.keep_order else opts.seed, skipped=skipped)  # fmt: skip
    print(f"wrote {index['samples']} samples to {len(entries)} shards in {opts.output_dir} "
          f"({index['bytes'] / 1e6:.1f} MB; index {index_path})")  # fmt: skip
    if problems:
        print(f"left out: {format_counts(skipped)}")
    print(f"train_shards: {pattern}")
    return 0
