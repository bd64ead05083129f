"""``python main.py check-data --config configs/<recipe>.yaml [--config overlay.yaml ...]``.

Scans every manifest of the config's ``data`` section and every audio header they point at, and
prints what is wrong, whatever ``on_bad_sample`` says: per split the rows read, the rows that are
fine and the problems per reason (see :mod:`datamodules.bad_samples`), then the first problems as
``manifest:line  reason  file  detail``, then warnings (valid clips shorter than
:data:`~datamodules.bad_samples.SHORT_CLIP_SECONDS`, and texts longer than the backbone's
``max_text_tokens``, which training and evaluation cut to it; see :mod:`datamodules.text_limits`).
Exit status 1 when anything is wrong, else 0; warnings do not count.

Only the data module is built, from the ``data`` sections of the configs (merged in order, like
the training CLI; short class names such as ``SyntheticDataModule`` work), so a 7B recipe is
checked without loading its model. Samples are not decoded unless ``--decode`` is given: then
every clip that passed the header scan is decoded in full by ``--workers`` processes (with a
progress bar), which finds truncated audio (``decode_error``), NaN or infinite samples
(``non_finite``) and clips that decode to nothing (``no_samples``), reported like the other
problems. ``--write_clean OUT.jsonl`` writes the rows that passed every check as a JSONL manifest
(absolute audio paths; one file per manifest, ``OUT.<split>.jsonl``, when the config has several);
the original manifests are never touched. Texts are counted with the backbone's tokenizer, loaded with
``AutoTokenizer.from_pretrained`` from the ``model.backbone`` section's ``name_or_path`` or from
``--tokenizer``, from files already on the machine (nothing is downloaded); a tiny backbone has no
tokenizer files, so without ``--tokenizer`` its texts are not counted (the report says so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from datamodules.audio import AudioDecodeError, decode_all
from datamodules.bad_samples import SHORT_CLIP_SECONDS, SkippedSample, count_reasons, format_counts
from datamodules.datamodule import RetrievalDataModule
from datamodules.datasets import qa_query_text
from datamodules.formats import ManifestSpec
from datamodules.manifest import ClipRecord, ManifestError, read_manifest, screen_audio
from datamodules.text_limits import DEFAULT_MAX_TEXT_TOKENS, text_token_counts

__all__ = [
    "SplitCheck",
    "TextLimit",
    "check_manifest",
    "format_report",
    "load_datamodule",
    "load_text_limit",
    "long_texts",
    "main",
    "record_texts",
]


@dataclass
class SplitCheck:
    """What the scan of one manifest found.

    Attributes:
        split: ``train``, ``val``, ``test``, ``predict``, or ``<split>/<set name>``.
        manifest: the manifest's path.
        rows: rows (or JSON-list entries) read.
        problems: the bad rows and audio files, in manifest order per kind.
        short_clips: ``(row source, audio path, seconds)`` of valid clips that are very short.
        long_texts: ``(row source, field, tokens)`` of texts over ``max_text_tokens`` (when counted).
        failure: why the manifest as a whole could not be read (``None`` when it could).
    """

    split: str
    manifest: str
    rows: int = 0
    problems: list[SkippedSample] = field(default_factory=list)
    short_clips: list[tuple[str, str, float]] = field(default_factory=list)
    long_texts: list[tuple[str, str, int]] = field(default_factory=list)
    failure: str | None = None
    #: the rows that passed every check run, in manifest order.
    clean: list[ClipRecord] = field(default_factory=list)

    @property
    def ok(self) -> int:
        """Rows with nothing wrong."""
        return self.rows - len(self.problems)


def load_datamodule(configs: list[str], overrides: list[str] = ()) -> RetrievalDataModule:
    """The data module of the configs' ``data`` sections, merged in order, then the ``--data.*``
    command-line ``overrides`` (``["--data.init_args.train_manifest", "x.jsonl", ...]``, as ``fit``
    takes them); nothing else is built.

    Raises:
        ValueError: no config has a ``data`` section.
    """
    parser = ArgumentParser(prog="main.py check-data", exit_on_error=False)
    parser.add_subclass_arguments(RetrievalDataModule, "data", required=True)
    args = []
    for path in configs:
        with open(path, encoding="utf-8") as handle:
            section = (yaml.safe_load(handle) or {}).get("data")
        if section is not None:
            args += ["--data", json.dumps(section)]
    if not args and not overrides:
        raise ValueError(f"no 'data' section in {configs}")
    config = parser.parse_args(args + list(overrides))
    instantiate = getattr(parser, "instantiate", parser.instantiate_classes)
    return instantiate(config).data


@dataclass
class TextLimit:
    """What the texts are checked against: the backbone's ``max_text_tokens`` and its tokenizer
    (``None`` when it could not be loaded; ``reason`` says why)."""

    max_text_tokens: int | None
    tokenizer: Any = None
    reason: str = ""


def load_text_limit(configs: list[str], tokenizer: str | None = None) -> TextLimit:
    """The ``model.backbone`` section's ``max_text_tokens`` (merged over the configs in order) and
    the tokenizer of ``tokenizer`` or of the section's ``name_or_path``."""
    init_args: dict[str, Any] = {}
    for path in configs:
        with open(path, encoding="utf-8") as handle:
            backbone = ((yaml.safe_load(handle) or {}).get("model") or {}).get("backbone") or {}
        init_args.update(backbone.get("init_args") or {})
    limit = TextLimit(init_args.get("max_text_tokens", DEFAULT_MAX_TEXT_TOKENS))
    source = tokenizer or init_args.get("name_or_path")
    if limit.max_text_tokens is None:
        limit.reason = "max_text_tokens is null (no limit)"
    elif source is None:
        limit.reason = "the backbone is tiny (no tokenizer files); give --tokenizer <directory or hub id>"
    else:
        from transformers import AutoTokenizer

        try:  # a data check downloads nothing: a model being trained has its files here already
            limit.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as err:
            limit.reason = f"no tokenizer files of {source} on this machine ({type(err).__name__}); give --tokenizer"
    return limit


def record_texts(record: ClipRecord) -> list[tuple[str, str]]:
    """``(field, text)`` of every text of a row that can be embedded (QA questions with their choices,
    as the query side gets them)."""
    texts = [(f"caption[{i}]" if len(record.captions) > 1 else "caption", text) for i, text in enumerate(record.captions)]
    if record.is_qa:
        texts.append(("question", qa_query_text(record)))
    for name, value in record.extra.items():
        if name in ("question", "tags") or not isinstance(value, (str, list)):
            continue
        values = [value] if isinstance(value, str) else value
        if all(isinstance(v, str) for v in values):
            texts += [(f"{name}[{i}]" if len(values) > 1 else name, v) for i, v in enumerate(values)]
    texts += [("tags", text) for text in record.texts("tags")]
    return texts


def long_texts(records: list[ClipRecord], limit: TextLimit) -> list[tuple[str, str, int]]:
    """``(row source, field, tokens)`` of the texts over ``limit.max_text_tokens``."""
    found = []
    for record in records:
        fields = record_texts(record)
        counts = text_token_counts(limit.tokenizer, [text for _, text in fields])
        found += [(record.source, name, n) for (name, _), n in zip(fields, counts) if n > limit.max_text_tokens]
    return found


def _manifests(datamodule: RetrievalDataModule) -> list[tuple[str, str | ManifestSpec, str | None]]:
    """``(split, manifest, audio_dir)`` of every manifest the data module would read."""
    found = []
    for split in ("train", "val", "test", "predict"):
        if split in datamodule.named_sets:
            for name, spec in datamodule.eval_sets(split):
                key = split if name is None else f"{split}/{name}"
                found.append((key, spec.manifest, spec.audio_dir or datamodule.audio_dir))
        elif datamodule.manifests[split] is not None:
            found.append((split, datamodule.manifests[split], datamodule.audio_dir))
    return found


def _decode_one(path: str) -> tuple[str, str] | None:
    """``(reason, message)`` of a clip that fails to decode in full, ``None`` for a good one."""
    try:
        decode_all(path)
    except AudioDecodeError as err:
        return err.reason, str(err)
    return None


def decode_records(records: list[ClipRecord], workers: int = 1, progress: bool = True) -> list[SkippedSample]:
    """Decode every clip of ``records`` in full with ``workers`` processes; the failures, in order."""
    paths = [record.audio_path for record in records]
    from tqdm import tqdm

    bar = dict(total=len(paths), desc="decoding", unit="clip", disable=not progress, file=sys.stderr)
    if workers <= 1:
        outcomes = list(tqdm(map(_decode_one, paths), **bar))
    else:
        with ProcessPoolExecutor(workers) as pool:
            chunk = max(1, min(64, len(paths) // (4 * workers)))
            outcomes = list(tqdm(pool.map(_decode_one, paths, chunksize=chunk), **bar))
    return [
        SkippedSample(outcome[0], record.source, record.audio_path, f"{record.source}: {outcome[1]}")
        for record, outcome in zip(records, outcomes)
        if outcome is not None
    ]


def check_manifest(
    split: str, manifest: str | ManifestSpec, audio_dir: str | None = None, text_limit: TextLimit | None = None,
    decode: bool = False, workers: int = 1, progress: bool = True,
) -> SplitCheck:
    """Scan one manifest and its audio headers, collecting every problem instead of stopping; with a
    ``text_limit`` holding a tokenizer, also its texts' lengths; with ``decode``, every sample of the
    clips whose header passed (``workers`` processes)."""
    result = SplitCheck(split, str(manifest))
    try:
        records = read_manifest(manifest, audio_dir, result.problems)
    except ManifestError as err:
        result.failure = str(err)
        return result
    result.rows = len(records) + len(result.problems)
    kept, durations = screen_audio(records, result.problems)
    result.problems.sort(key=_row_number)  # row problems, then header problems -> manifest order
    result.short_clips = [
        (r.source, r.audio_path, d) for r, d in zip(kept, durations) if d < SHORT_CLIP_SECONDS and not r.is_text_pair
    ]
    if text_limit is not None and text_limit.tokenizer is not None:
        result.long_texts = long_texts(kept, text_limit)
    result.clean = kept
    if decode:
        failed = decode_records([r for r in kept if not r.is_text_pair], workers, progress)
        result.problems += failed
        result.problems.sort(key=_row_number)
        bad = {problem.source for problem in failed}
        result.clean = [record for record in kept if record.source not in bad]
    return result


def clean_row(record: ClipRecord) -> dict[str, Any]:
    """A record as a JSONL manifest row that :func:`~datamodules.manifest.read_jsonl` reads back to it."""
    if record.is_text_pair:
        row = {"id": record.id, "query_text": record.extra["query_text"], "document_text": record.captions[0]}
        if "hard_negatives" in record.extra:
            row["hard_negatives"] = record.extra["hard_negatives"]
        return row
    row = {"id": record.id, "audio": os.path.abspath(record.audio_path)}
    if record.captions:
        row["caption"] = record.captions
    row.update(record.extra)
    return row


def write_clean(checks: list[SplitCheck], output: str) -> list[str]:
    """Write each readable manifest's clean rows as JSONL (see the module docstring); the files written."""
    readable = [check for check in checks if check.failure is None]
    stem = output.removesuffix(".jsonl")
    written = []
    for check in readable:
        path = output if len(readable) == 1 else f"{stem}.{check.split.replace('/', '-')}.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            for record in check.clean:
                handle.write(json.dumps(clean_row(record), ensure_ascii=False) + "\n")
        written.append(path)
    return written


def _row_number(problem: SkippedSample) -> int:
    """The line (or entry) number ending a ``manifest:line`` or ``manifest:entry N`` source."""
    return int(problem.source.rsplit(" ", 1)[-1].rsplit(":", 1)[-1])


def _detail(problem: SkippedSample) -> str:
    """The error message without the row and file the report lists in columns of their own."""
    detail = problem.detail.removeprefix(f"{problem.source}: ")
    return detail.removesuffix(f" (audio {problem.path})") if problem.path else detail


def format_report(checks: list[SplitCheck], max_problems: int = 20, text_limit: TextLimit | None = None) -> str:
    """The report ``check-data`` prints (see the module docstring)."""
    lines = [f"{'split':<12} {'rows':>8} {'ok':>8}  problems  (manifest)"]
    for check in checks:
        if check.failure is not None:
            lines.append(f"{check.split:<12} {'-':>8} {'-':>8}  unreadable manifest  ({check.manifest})")
            continue
        counts = format_counts(count_reasons(check.problems))
        lines.append(f"{check.split:<12} {check.rows:>8} {check.ok:>8}  {counts}  ({check.manifest})")
    for check in checks:
        if check.failure is not None:
            lines.append(f"cannot read {check.manifest}: {check.failure}")
    problems = [p for check in checks for p in check.problems]
    if problems:
        lines.append(f"problems (first {min(max_problems, len(problems))} of {len(problems)}):")
        lines += [f"  {p.source}  {p.reason}  {p.path or '-'}  {_detail(p)}" for p in problems[:max_problems]]
    short = [clip for check in checks for clip in check.short_clips]
    if short:
        lines.append(f"warnings: {len(short)} clips shorter than {SHORT_CLIP_SECONDS} s (valid; padded for the model)")
        lines += [f"  {source}  short_clip  {path}  {seconds:.3f} s" for source, path, seconds in short[:max_problems]]
    long = [text for check in checks for text in check.long_texts]
    if long:
        lines.append(
            f"warnings: {len(long)} texts longer than max_text_tokens={text_limit.max_text_tokens} "
            "(valid; cut to it when embedded)"
        )
        lines += [f"  {source}  long_text  {name}  {tokens} tokens" for source, name, tokens in long[:max_problems]]
    if text_limit is not None and text_limit.tokenizer is None:
        lines.append(f"text lengths not checked: {text_limit.reason}")
    failed = sum(check.failure is not None for check in checks)
    verdict = f"{len(problems)} problems" + (f", {failed} unreadable manifests" if failed else "")
    lines.append(f"result: {verdict}" if problems or failed else "result: no problems")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> int:
    """Run ``check-data``; returns the exit status (1 when anything is wrong, 0 otherwise)."""
    parser = argparse.ArgumentParser(
        prog="main.py check-data",
        description="Scan the manifests and audio headers of a config's data section and report bad samples.",
    )
    parser.add_argument("--config", action="append", required=True, help="recipe YAML; repeat to add overlays")
    parser.add_argument("--max_problems", type=int, default=20, help="problems and warnings listed in full")
    parser.add_argument(
        "--tokenizer",
        help="tokenizer (directory or hub id) that counts the texts against the backbone's max_text_tokens; "
        "default: the backbone's name_or_path",
    )
    parser.add_argument("--decode", action="store_true", help="decode every clip in full (finds truncated and NaN audio)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes")
    parser.add_argument("--write_clean", metavar="OUT.jsonl", help="write the rows that passed as a JSONL manifest")
    parser.epilog = "Any --data.* setting of fit (e.g. --data.init_args.train_manifest x.jsonl) overrides the configs."
    options, rest = parser.parse_known_args(args)
    unknown = [arg for arg in rest if arg.startswith("--") and not arg.startswith("--data.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (only --data.* settings can be overridden)")
    datamodule = load_datamodule(options.config, rest)
    text_limit = load_text_limit(options.config, options.tokenizer)
    datamodule.prepare_data()  # generated data sets (SyntheticDataModule) write their manifests here
    checks, seen = [], {}
    for split, manifest, audio_dir in _manifests(datamodule):
        key = (repr(manifest), audio_dir)  # a spec is no dictionary key; its repr names every option
        if key in seen:
            print(f"{split}: same manifest as {seen[key]} ({manifest})")
            continue
        seen[key] = split
        checks.append(check_manifest(split, manifest, audio_dir, text_limit, options.decode, options.workers,
                                     progress=True))
    print(format_report(checks, options.max_problems, text_limit))
    shards = getattr(datamodule, "train_shards", None)
    if shards:  # WebDatasetDataModule: the shards are checked when read (see datamodules.shards)
        print(f"train: {len(shards)} WebDataset shards, not scanned here (their samples are checked as training reads them)")
    if options.write_clean:
        for path in write_clean(checks, options.write_clean):
            print(f"clean manifest: {path}")
    return int(any(check.problems or check.failure is not None for check in checks))
