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
checked without loading its model. Samples are not decoded: truncated or non-finite audio only
shows when a clip is loaded. Texts are counted with the backbone's tokenizer, loaded with
``AutoTokenizer.from_pretrained`` from the ``model.backbone`` section's ``name_or_path`` or from
``--tokenizer``, from files already on the machine (nothing is downloaded); a tiny backbone has no
tokenizer files, so without ``--tokenizer`` its texts are not counted (the report says so).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from datamodules.bad_samples import SHORT_CLIP_SECONDS, SkippedSample, count_reasons, format_counts
from datamodules.datamodule import RetrievalDataModule
from datamodules.datasets import qa_query_text
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


def _manifests(datamodule: RetrievalDataModule) -> list[tuple[str, str, str | None]]:
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


def check_manifest(
    split: str, manifest: str, audio_dir: str | None = None, text_limit: TextLimit | None = None
) -> SplitCheck:
    """Scan one manifest and its audio headers, collecting every problem instead of stopping; with a
    ``text_limit`` holding a tokenizer, also its texts' lengths."""
    result = SplitCheck(split, manifest)
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
    return result


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
        if (manifest, audio_dir) in seen:
            print(f"{split}: same manifest as {seen[manifest, audio_dir]} ({manifest})")
            continue
        seen[manifest, audio_dir] = split
        checks.append(check_manifest(split, manifest, audio_dir, text_limit))
    print(format_report(checks, options.max_problems, text_limit))
    return int(any(check.problems or check.failure is not None for check in checks))
