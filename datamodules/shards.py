"""Training pairs streamed from WebDataset shards, every sample exactly once per epoch.

**Format** (LAION's audio-dataset layout, which CLAP trains on): tar files whose members come in
samples, the consecutive members sharing a key: ``<key>.<audio extension>`` (``flac``, ``wav``,
``mp3``, ``ogg``, ...) holding the original audio file and ``<key>.json`` holding its row::

    train-000000.tar
        0001.flac   0001.json  {"text": ["a dog barks", "barking"], "id": "0001", "duration": 9.8, "tags": ["dog"]}
        0002.flac   0002.json  {"text": "rain on a roof", "duration": 30.0}

``text`` is the caption or the list of captions (QA rows with ``question`` / ``answer`` and class
rows with ``label`` / ``labels`` may leave it out, as in a manifest); ``id`` is the clip id (default:
the key); ``duration`` (seconds) is what duration bucketing sorts by; every other field is read as a
manifest row's (``caption_long``, ``tags``, ``instruction``, ...). A key is the member name up to its
first dot, so keys hold no dots. ``python main.py shard`` (:mod:`datamodules.shard_writer`) writes
such shards from any manifest, with an index of their sample counts.

**Counts.** The split below needs every shard's sample count before the epoch starts. They come
from the shards' ``index.json`` (written by ``python main.py shard``; the data module looks for it
beside the first shard, or takes ``train_index``), or else from reading every shard once in
``setup``. A shard that turns out to hold another number of samples than counted stops the run,
naming it.

**Split** (:class:`ShardPlan`, a pure function of the counts, the seed, the epoch, the number of
processes W, the data-loader workers per process K and the batch size B): the shards are put in an
order drawn from ``(seed, epoch)``, their samples laid end to end. Process r takes the r-th
contiguous share of ``N // W`` or ``N // W + 1`` samples (the first ``N % W`` processes one more),
so the shares partition the epoch. Every process makes the same number of steps, ``T =
ceil(ceil(N / W) / B)``: its batches are full (B clips) except its last ones, which share what
remains as evenly as possible (none is empty; so a process's batch may hold fewer than B clips, and
with B = 1 the samples must divide evenly over the processes). Step t of a process comes from its
stream ``t mod K``, the order in which the data loader cycles through its workers; each stream reads
one contiguous part of the process's share, so a worker opens only the shards of its part (a shard
split between streams is read up to the part's end by each of them). With fewer shards than
processes × workers the parts simply lie inside shards. Nothing is duplicated, padded or dropped.

**Order.** Besides the shard order, each stream passes its samples through a shuffle buffer of
``shuffle_buffer`` samples (a random one of the buffer is emitted as each new one arrives) seeded by
``(seed, epoch, rank, stream)``; with duration bucketing each stream then sorts pools of
``bucket_pool_multiplier`` batches by the JSON's ``duration`` (samples without one sort last, with
each other), cuts them into its batches and shuffles the full batches of the pool (the short ones
stay last). Bucketing is per stream: unlike :class:`~datamodules.bucketing.DurationBatchSampler`,
the processes of one step do not share a bucket. Captions and crops are drawn from ``(seed, epoch, sample index)``, the index
being the sample's position in the shard list, as :class:`~datamodules.datasets.PairDataset` draws
them. Samples are decoded only when their batch is asked for; the buffer holds their bytes.

**Resume** is sample-exact: the batch of step t is a function of ``(seed, epoch, t)`` and the
layout, so a run resumed from a checkpoint after ``done`` steps asks for steps ``done, done + 1,
...`` (:class:`~datamodules.resume.StepSampler`, moved by the data module's checkpoint state as for
manifests), and the worker serving a stream reads it again from its parts' start, skipping the
batches already trained without decoding them. It then trains the same batches in the same order as
the uninterrupted run. This holds for the same number of processes, workers and batch size; other
values give another split.

**Bad samples** follow ``on_bad_sample``: a sample without an audio or a JSON member
(``missing_member``), a JSON that does not parse or lacks ``text`` (the manifest reasons), audio
that does not decode (the audio reasons), and a tar that cannot be opened or read
(``unreadable_shard``) stop the run with an error naming the shard and the member, or under
``skip`` are counted by reason and their place in the batch stays empty.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from types import SimpleNamespace
from typing import Any
from urllib.parse import urljoin, urlparse

import numpy as np
from torch.utils.data import DataLoader, Dataset

from datamodules.audio import _DECODABLE_EXTENSIONS
from datamodules.bad_samples import (
    INVALID_JSON,
    MISSING_FIELD,
    MISSING_MEMBER,
    NOT_AN_OBJECT,
    UNREADABLE_SHARD,
    WRONG_TYPE,
    BadSamplePolicy,
    SkippedSample,
    count_reasons,
    format_counts,
)
from datamodules.datamodule import RetrievalDataModule
from datamodules.datasets import PairDataset
from datamodules.manifest import ClipRecord, ManifestError, row_record
from datamodules.resume import StepSampler

__all__ = [
    "INDEX_NAME",
    "ShardInfo",
    "ShardPairs",
    "ShardPlan",
    "ShardReadError",
    "WebDatasetDataModule",
    "expand_shards",
    "parse_sample",
    "read_index",
    "shard_samples",
]

log = logging.getLogger(__name__)

#: the index file ``python main.py shard`` writes beside the shards.
INDEX_NAME = "index.json"
#: member extensions taken for a sample's audio (the first such member of the sample is used).
AUDIO_MEMBER_EXTENSIONS = frozenset(ext.lstrip(".") for ext in _DECODABLE_EXTENSIONS) | {
    "mp3", "m4a", "aac", "webm", "wma", "opus",
}  # fmt: skip


def webdataset_library() -> SimpleNamespace:
    """What is used of the ``webdataset`` package, imported on first use: ``gopen`` (opens a path or
    URL), ``expand_urls`` (brace patterns), ``tar_file_iterator`` and ``base_plus_ext`` (tar streams)."""
    try:
        from webdataset.gopen import gopen
        from webdataset.shardlists import expand_urls
        from webdataset.tariterators import base_plus_ext, tar_file_iterator
    except ImportError as err:
        raise ImportError(
            "reading WebDataset shards needs the webdataset package: pip install -e '.[webdataset]'"
        ) from err
    return SimpleNamespace(gopen=gopen, expand_urls=expand_urls, tar_file_iterator=tar_file_iterator,
                           base_plus_ext=base_plus_ext)  # fmt: skip


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """The shard paths or URLs of a brace pattern (``data/{000000..000999}.tar``; several joined by
    ``::``) or of a list of them, in order.

    Raises:
        ValueError: the patterns give no shard, or one shard twice.
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    expand = webdataset_library().expand_urls
    urls = [url for pattern in patterns for url in expand(pattern)]
    if not urls:
        raise ValueError(f"train_shards {spec!r} names no shard")
    repeated = sorted(url for url, times in Counter(urls).items() if times > 1)
    if repeated:
        raise ValueError(f"train_shards names these shards more than once: {repeated[:5]}")
    return urls


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> str:
    return os.path.abspath(urlparse(url).path if url.startswith("file:") else url)


def _same_shard_key(url: str) -> str:
    """What identifies a shard when its URL in the index and in ``train_shards`` are spelled differently."""
    return os.path.normpath(_local_path(url)) if _is_local(url) else url


class ShardReadError(OSError):
    """A shard (tar file or URL) cannot be opened or read; the message names it."""


def shard_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` of every sample of a shard, in tar order.

    A sample is a run of consecutive members sharing a key (the member name up to its first dot); a
    member without an extension is a sample of its own with extension ``""``. The shard is opened
    with ``webdataset.gopen`` (local paths, ``file:``, ``http(s):``, ``pipe:``, ...) and read with
    its tar iterator, as a stream. When reading fails, the sample being read is lost; the samples
    before it have been yielded.

    Raises:
        ShardReadError: the shard cannot be opened, is not a tar, or breaks off.
    """
    wds = webdataset_library()
    try:
        stream = wds.gopen(url)
    except Exception as err:  # whatever the URL's opener raises (missing file, unknown scheme, ...)
        raise ShardReadError(f"cannot open shard {url}: {err}") from err
    key, members, samples = None, {}, 0
    try:
        for member in wds.tar_file_iterator(stream):
            name = member["fname"]
            base, ext = wds.base_plus_ext(name)
            if base is None:
                base, ext = name, ""
            if base != key or ext in members:
                if key is not None:
                    yield key, members
                    samples += 1
                key, members = base, {}
            members[ext] = member["data"]
    except Exception as err:  # tarfile.ReadError, OSError, EOFError, zlib errors, a failed download
        raise ShardReadError(f"cannot read shard {url} after {samples} samples: {err}") from err
    finally:
        stream.close()
    if key is not None:
        yield key, members


def _members(key: str, members: dict[str, bytes]) -> str:
    return ", ".join(f"{key}.{ext}" if ext else key for ext in members)


def parse_sample(shard: str, key: str, members: dict[str, bytes]) -> tuple[ClipRecord, float | None]:
    """The record of one shard sample (its audio bytes in ``audio_data``) and its JSON ``duration``.

    The record's ``source`` is ``shard:key`` and its ``audio_path`` ``shard:key.ext``, which every
    message about the sample names.

    Raises:
        ManifestError: no JSON or no audio member (``missing_member``), a JSON that does not parse
            or is not an object, no ``text`` on a row that needs one, or a field of the wrong type
            or empty; ``reason`` says which.
    """
    where = f"{shard}:{key}"
    if "" in members:
        raise ManifestError(
            f"{where}: member '{key}' has no extension (a sample's members are <key>.<ext>)", MISSING_MEMBER, where
        )
    if "json" not in members:
        raise ManifestError(f"{where}: sample has no .json member (members: {_members(key, members)})",
                            MISSING_MEMBER, where)  # fmt: skip
    audio = next((ext for ext in members if ext.rsplit(".", 1)[-1].lower() in AUDIO_MEMBER_EXTENSIONS), None)
    if audio is None:
        raise ManifestError(
            f"{where}: sample has no audio member (members: {_members(key, members)}; audio is .flac, .wav, .mp3, "
            ".ogg, ...)", MISSING_MEMBER, where,
        )  # fmt: skip
    audio_path = f"{where}.{audio}"
    try:
        row = json.loads(members["json"])
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise ManifestError(f"{where}.json: invalid JSON ({err})", INVALID_JSON, where, audio_path) from err
    if not isinstance(row, dict):
        raise ManifestError(f"{where}.json: must be a JSON object, got {type(row).__name__}", NOT_AN_OBJECT, where,
                            audio_path)  # fmt: skip
    if "caption" in row:
        raise ManifestError(f"{where}.json: the captions of a shard sample go in 'text', not 'caption'", WRONG_TYPE,
                            where, audio_path)  # fmt: skip
    duration = row.get("duration")
    if duration is not None and (
        isinstance(duration, bool) or not isinstance(duration, (int, float)) or not math.isfinite(duration) or duration < 0
    ):
        raise ManifestError(f"{where}.json: 'duration' must be a number of seconds, got {duration!r}", WRONG_TYPE,
                            where, audio_path)  # fmt: skip
    record = row_record(row, audio_path, row.get("id", key), where, skip=("id", "duration"), caption_field="text")
    record.audio_data = members[audio]
    return record, None if duration is None else float(duration)


@dataclass(frozen=True)
class ShardInfo:
    """One shard of the training set.

    Attributes:
        url: its path or URL.
        samples: how many samples it holds.
        first: index of its first sample in the whole set (the shards in ``train_shards`` order).
        counted_by: where ``samples`` comes from (the index file, or ``"a scan in setup"``).
    """

    url: str
    samples: int
    first: int
    counted_by: str


def read_index(path: str) -> dict[str, int]:
    """``{shard: samples}`` of an ``index.json`` (see :mod:`datamodules.shard_writer`), shard URLs
    relative to the index resolved against its location and normalised as :func:`expand_shards`
    spells them.

    Raises:
        ManifestError: the index cannot be read, is not JSON, or an entry lacks its ``url`` or
            ``samples``.
    """
    wds = webdataset_library()
    try:
        with wds.gopen(path) as handle:
            data = json.loads(handle.read())
    except Exception as err:
        raise ManifestError(f"cannot read the shard index {path}: {err}", UNREADABLE_SHARD, path) from err
    entries = data.get("shards") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ManifestError(f"{path}: a shard index is an object with a 'shards' list", WRONG_TYPE, path)
    counts = {}
    for i, entry in enumerate(entries):
        url, samples = (entry.get("url"), entry.get("samples")) if isinstance(entry, dict) else (None, None)
        if not isinstance(url, str) or not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
            raise ManifestError(f"{path}: shards[{i}] needs a 'url' and a count 'samples', got {entry!r}", WRONG_TYPE,
                                path)  # fmt: skip
        if not urlparse(url).scheme and not os.path.isabs(url):
            url = os.path.join(os.path.dirname(_local_path(path)), url) if _is_local(path) else urljoin(path, url)
        counts[_same_shard_key(url)] = samples
    return counts


def default_index(urls: Sequence[str]) -> str | None:
    """The ``index.json`` beside the first shard, when that shard is a local file and the index exists."""
    if not _is_local(urls[0]):
        return None
    candidate = os.path.join(os.path.dirname(_local_path(urls[0])), INDEX_NAME)
    return candidate if os.path.isfile(candidate) else None


class ShardPlan:
    """Which samples each stream of each process reads in an epoch, and how they are batched (the
    rule is in the module docstring).

    Args:
        counts: samples per shard, in the shard list's order.
        batch_size: clips per batch (per process).
        world_size: processes.
        streams: streams per process: its data-loader workers (1 without workers).
        seed: seed of the shard order.

    Raises:
        ValueError: fewer samples than processes, or batches of 1 whose count does not divide evenly.
    """

    def __init__(self, counts: Sequence[int], batch_size: int, world_size: int = 1, streams: int = 1, seed: int = 0):
        if batch_size < 1 or world_size < 1 or streams < 1 or seed < 0:
            raise ValueError(f"need batch_size, world_size, streams >= 1 and seed >= 0, got {batch_size}, "
                             f"{world_size}, {streams}, {seed}")  # fmt: skip
        self.counts = [int(c) for c in counts]
        self.batch_size, self.world_size, self.streams, self.seed = batch_size, world_size, streams, seed
        total = sum(self.counts)
        self.total = total
        #: samples of each process per epoch.
        self.rank_samples = [total // world_size + (r < total % world_size) for r in range(world_size)]
        #: training steps per epoch, the same on every process.
        self.steps = math.ceil(self.rank_samples[0] / batch_size)
        if self.rank_samples[-1] == 0:
            raise ValueError(f"the shards hold {total} samples: fewer than the {world_size} processes")
        if self.rank_samples[-1] < self.steps:
            raise ValueError(
                f"{total} samples cannot give each of {world_size} processes {self.steps} non-empty batches of at "
                f"most {batch_size}; use a batch size above 1 or a sample count divisible by the processes"
            )

    def batch_sizes(self, rank: int) -> list[int]:
        """Clips of each of the process's batches, step by step: full batches, then the last ones
        sharing the rest (larger first), none empty."""
        n, steps, size = self.rank_samples[rank], self.steps, self.batch_size
        full = steps if size == 1 else min(steps, (n - steps) // (size - 1))
        rest, left = n - full * size, steps - full
        return [size] * full + [rest // left + (i < rest % left) for i in range(left)]

    def stream_batch_sizes(self, rank: int, stream: int) -> list[int]:
        """Clips of the batches of one stream: those of the steps ``t`` with ``t mod streams == stream``."""
        return self.batch_sizes(rank)[stream :: self.streams]

    def shard_order(self, epoch: int) -> np.ndarray:
        """The epoch's order of the shards (indices into the shard list)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))

    def stream_pieces(self, epoch: int, rank: int, stream: int) -> list[tuple[int, int, int]]:
        """The parts of shards a stream reads, in order: ``(shard index, first sample, end sample)``."""
        sizes = self.batch_sizes(rank)
        start = sum(self.rank_samples[:rank]) + sum(sum(sizes[k :: self.streams]) for k in range(stream))
        stop = start + sum(sizes[stream :: self.streams])
        pieces, position = [], 0  # position: where the shard starts in the epoch's sequence
        for shard in self.shard_order(epoch):
            count = self.counts[shard]
            lo, hi = max(start, position), min(stop, position + count)
            if lo < hi:
                pieces.append((int(shard), lo - position, hi - position))
            position += count
            if position >= stop:
                break
        return pieces


@dataclass
class _Sample:
    """A sample on its way through a stream: its record (or why it was dropped), its index in the
    whole set and its JSON duration."""

    record: ClipRecord | SkippedSample
    index: int
    duration: float | None = None


def shuffle_buffer(samples: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """``samples`` in a random order, holding at most ``size`` of them: once the buffer is full, each
    new sample replaces a random one of the buffer, which is emitted; at the end the buffer empties
    in a random order. ``size`` ≤ 1 keeps the order."""
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = sample
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]


def _cut(samples: Iterator[Any], sizes: Sequence[int]) -> Iterator[list[Any]]:
    for size in sizes:
        yield list(islice(samples, size))


class ShardPairs(Dataset):
    """One process's training batches read from shards: item ``(epoch, step)`` is the list of
    training items (or :class:`~datamodules.bad_samples.SkippedSample` markers) of its batch of that
    step, as :class:`ShardPlan` lays them out; the data loader's ``collate_fn`` (the model's pair
    collator) makes the batch.

    Each process (the main one without workers, else each worker) keeps the streams it serves open
    between calls: step ``t`` belongs to stream ``t mod streams``, and the data loader hands a worker
    every ``streams``-th step, so it reads its stream straight through. Asked for a later batch of a
    stream than the next one (a resumed run), it skips the batches between without decoding them;
    asked for an earlier one, it reads the stream again from its start. The results never depend on
    which worker is asked.

    Args:
        shards: the shards, with their counts.
        plan: the epoch layout; its ``streams`` must equal the loader's workers (1 without).
        rank: this process's rank.
        items: builds each training item from a sample's record (caption draw, crop, decoding).
        shuffle_buffer: samples held by each stream's shuffle buffer.
        bucket_pool: with duration bucketing, batches per sorting pool; ``None``: no bucketing.
        max_seconds: durations above it sort as equal (the clips are cropped to it); ``None``: no cap.
        on_bad_sample: ``"error"`` raises on a bad sample or shard; ``"skip"`` puts a marker in its place.
    """

    def __init__(
        self,
        shards: Sequence[ShardInfo],
        plan: ShardPlan,
        rank: int,
        items: PairDataset,
        shuffle_buffer: int = 500,
        bucket_pool: int | None = None,
        max_seconds: float | None = None,
        on_bad_sample: BadSamplePolicy = "error",
    ):
        if [s.samples for s in shards] != plan.counts:
            raise ValueError("the plan's counts are not those of the shards")
        if shuffle_buffer < 0 or (bucket_pool is not None and bucket_pool < 1):
            raise ValueError(f"need shuffle_buffer >= 0 and bucket_pool >= 1, got {shuffle_buffer} and {bucket_pool}")
        self.shards = list(shards)
        self.plan = plan
        self.rank = rank
        self.items = items
        self.shuffle_buffer = shuffle_buffer
        self.bucket_pool = bucket_pool
        self.max_seconds = max_seconds
        self.on_bad_sample = on_bad_sample
        self._open: dict[int, list] = {}  # stream -> [epoch, next batch position, batch generator]

    def __getstate__(self) -> dict[str, Any]:
        # Workers start with no open stream (generators do not pickle).
        return {**self.__dict__, "_open": {}}

    def __len__(self) -> int:
        return self.plan.steps

    def __getitem__(self, key: tuple[int, int]) -> list[dict[str, Any] | SkippedSample]:
        epoch, step = key
        stream, position = step % self.plan.streams, step // self.plan.streams
        state = self._open.get(stream)
        if state is None or state[0] != epoch or state[1] > position:
            # Streams of other epochs are done with; this one starts again from its beginning.
            for other, (open_epoch, _, batches) in list(self._open.items()):
                if open_epoch != epoch or other == stream:
                    batches.close()
                    del self._open[other]
            state = self._open[stream] = [epoch, 0, self.batches(epoch, stream)]
        while state[1] <= position:
            batch = next(state[2], None)
            if batch is None:
                raise IndexError(f"step {step} is past the {self.plan.steps} steps of an epoch")
            state[1] += 1
        return [self._item(sample, epoch) for sample in batch]

    def _item(self, sample: _Sample, epoch: int) -> dict[str, Any] | SkippedSample:
        if isinstance(sample.record, SkippedSample):
            return sample.record
        return self.items.item(sample.record, sample.index, epoch)

    def batches(self, epoch: int, stream: int) -> Iterator[list[_Sample]]:
        """The stream's batches of an epoch, undecoded, in order."""
        shuffle_seq, bucket_seq = np.random.SeedSequence([self.plan.seed, epoch, self.rank, stream]).spawn(2)
        samples = shuffle_buffer(self.samples(epoch, stream), self.shuffle_buffer, np.random.default_rng(shuffle_seq))
        sizes = self.plan.stream_batch_sizes(self.rank, stream)
        if self.bucket_pool is None:
            yield from _cut(samples, sizes)
            return
        rng = np.random.default_rng(bucket_seq)
        for begin in range(0, len(sizes), self.bucket_pool):
            group = sizes[begin : begin + self.bucket_pool]
            pool = sorted(islice(samples, sum(group)), key=self._sort_key)  # stable: ties keep the random order
            cut = list(_cut(iter(pool), group))
            # The batches in a random order, the short ones (a process's last) still last.
            yield from sorted((cut[i] for i in rng.permutation(len(cut))), key=len, reverse=True)

    def _sort_key(self, sample: _Sample) -> float:
        if sample.duration is None:
            return math.inf
        return sample.duration if self.max_seconds is None else min(sample.duration, self.max_seconds)

    def samples(self, epoch: int, stream: int) -> Iterator[_Sample]:
        """The stream's samples of an epoch in reading order (before the shuffle buffer)."""
        for shard, begin, end in self.plan.stream_pieces(epoch, self.rank, stream):
            yield from self._read(self.shards[shard], begin, end)

    def _read(self, shard: ShardInfo, begin: int, end: int) -> Iterator[_Sample]:
        """Samples ``begin`` to ``end`` of a shard; the ones before ``begin`` are read past, unparsed."""
        position = 0
        groups = shard_samples(shard.url)
        try:
            for key, members in groups:
                if position == end:
                    if end == shard.samples:
                        raise ManifestError(
                            f"{shard.url}: holds more samples than the {shard.samples} counted by {shard.counted_by} "
                            f"(sample '{key}' is past them); write the index again", UNREADABLE_SHARD, shard.url
                        )  # fmt: skip
                    return
                if position >= begin:
                    yield self._parse(shard, key, members, position)
                position += 1
        except ShardReadError as err:
            if self.on_bad_sample == "error":
                raise
            for lost in range(max(position, begin), end):
                yield _Sample(SkippedSample(UNREADABLE_SHARD, shard.url, shard.url, str(err)), shard.first + lost)
            return
        finally:
            groups.close()
        if position < end:
            raise ManifestError(
                f"{shard.url}: ends after {position} samples, but {shard.counted_by} counts {shard.samples}: the shard "
                "is truncated or the index is stale", UNREADABLE_SHARD, shard.url
            )  # fmt: skip

    def _parse(self, shard: ShardInfo, key: str, members: dict[str, bytes], position: int) -> _Sample:
        index = shard.first + position
        try:
            record, duration = parse_sample(shard.url, key, members)
            if not self.items.has_texts(record):
                raise ManifestError(f"{record.source}: sample has none of the caption fields {self.items.caption_fields}",
                                    MISSING_FIELD, record.source, record.audio_path)  # fmt: skip
        except ManifestError as err:
            if self.on_bad_sample == "error":
                raise
            return _Sample(err.skipped(), index)
        return _Sample(record, index, duration)


def count_shards(
    urls: Sequence[str], index: str | None, problems: list[SkippedSample] | None = None
) -> list[ShardInfo]:
    """The shards with their sample counts, from ``index`` or, without one, by reading every shard.

    Args:
        urls: the shards, in order.
        index: an ``index.json`` listing every one of them; ``None`` reads them.
        problems: when given, a shard that breaks off while read counts the samples before the
            failure and its failure goes here (``unreadable_shard``) instead of raising.

    Raises:
        ManifestError: a shard is not in the index.
        ShardReadError: a shard cannot be read (unless ``problems`` is given).
    """
    shards, first = [], 0
    listed = read_index(index) if index is not None else None
    for url in urls:
        if listed is not None:
            samples = listed.get(_same_shard_key(url))
            if samples is None:
                raise ManifestError(f"shard {url} is not listed in the index {index}; write the index again "
                                    "(python main.py shard --index_shards ...)", UNREADABLE_SHARD, url)  # fmt: skip
            counted_by = f"the index {index}"
        else:
            samples, counted_by = 0, "a scan in setup"
            try:
                for _ in shard_samples(url):
                    samples += 1
            except ShardReadError as err:
                if problems is None:
                    raise
                problems.append(SkippedSample(UNREADABLE_SHARD, url, url, str(err)))
        shards.append(ShardInfo(url, samples, first, counted_by))
        first += samples
    return shards


class WebDatasetDataModule(RetrievalDataModule):
    """:class:`RetrievalDataModule` whose training pairs stream from WebDataset shards (format,
    split, order, resume and bad samples in :mod:`datamodules.shards`); validation, test and
    predict read manifests and evaluation sets as there.

    Every sample is read exactly once per epoch over all processes and data-loader workers, all
    processes make the same number of steps, and a run resumed from a mid-epoch checkpoint trains
    the same batches as the uninterrupted one. Duration bucketing (``bucket_by_duration``) sorts by
    the samples' JSON ``duration``. Needs the optional extra ``webdataset``.

    Args:
        train_shards: the training shards: a brace pattern (``data/wavcaps/{000000..000999}.tar``;
            several joined by ``::``) or a list of them, local paths or any URL ``webdataset`` opens
            (``https://...``, ``pipe:curl -s ...``).
        train_index: the shards' ``index.json`` (sample counts; ``python main.py shard`` writes
            it); ``None`` uses the ``index.json`` beside the first shard when there is one, else
            reads every shard once in :meth:`setup` to count its samples.
        shuffle_buffer: samples each stream holds in its shuffle buffer (their bytes, undecoded:
            memory per worker is about this many clips' files).
        **kwargs: the settings of :class:`RetrievalDataModule` (``val_manifest``, ``test_sets``,
            ``batch_size``, ``num_workers``, ``seed``, ``bucket_by_duration``,
            ``bucket_pool_multiplier`` (batches per sorting pool here), ``on_bad_sample``, ...),
            except ``train_manifest`` and ``mined_negatives``.
    """

    def __init__(
        self,
        train_shards: str | list[str],
        train_index: str | None = None,
        shuffle_buffer: int = 500,
        **kwargs: Any,
    ):
        for name in ("train_manifest", "mined_negatives"):
            if kwargs.get(name) is not None:
                raise ValueError(f"WebDatasetDataModule trains on train_shards; remove {name}")
        super().__init__(**kwargs)
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.train_shards = expand_shards(train_shards)
        self.train_index = train_index
        self.shuffle_buffer = shuffle_buffer
        self._shards: list[ShardInfo] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read the evaluation manifests the stage needs and, when fitting, the shards' counts."""
        super().setup(stage)
        if stage in (None, "fit"):
            self.shards()

    def shards(self) -> list[ShardInfo]:
        """The training shards with their sample counts (counted once)."""
        if self._shards is None:
            index = self.train_index or default_index(self.train_shards)
            if index is None:
                log.info("no shard index: reading %d shards to count their samples", len(self.train_shards))
            problems: list[SkippedSample] | None = [] if self.on_bad_sample == "skip" else None
            self._shards = count_shards(self.train_shards, index, problems)
            if problems:
                log.warning("train: %s in %d shards", format_counts(count_reasons(problems)), len(self.train_shards))
            self.skipped["train"] = problems or []
        return self._shards

    def train_dataloader(self) -> DataLoader:
        sampling_rate, _ = self._bound()
        shards = self.shards()
        world, rank = self._world()
        plan = ShardPlan([s.samples for s in shards], self.batch_size, world, max(1, self.num_workers), self.seed)
        items = self.train_pairs([], sampling_rate)
        dataset = ShardPairs(
            shards,
            plan,
            rank,
            items,
            shuffle_buffer=self.shuffle_buffer,
            bucket_pool=self.bucket_pool_multiplier if self.bucket_by_duration else None,
            max_seconds=self.train_policy.max_seconds,
            on_bad_sample=self.on_bad_sample,
        )
        # batch_size=None: each item is already a batch; the collate function makes it a tensor batch.
        return self._resumed(self._loader(dataset, None, sampler=StepSampler(plan.steps, world, rank)))
