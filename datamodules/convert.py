"""``python main.py convert --manifest PATH_OR_SPEC [options] --output OUT.jsonl``.

Reads a manifest in any format :mod:`datamodules.formats` knows (Clotho or AudioCaps CSV, WavCaps
JSON, a Hugging Face dataset, the NLI CSV, a JSON list, JSONL) and writes its records as a JSONL
manifest, one row per clip as :func:`datamodules.check.clean_row` writes it (absolute audio paths;
all captions of a clip in its ``caption`` list; the other fields kept), which reads back to the
same records. Clips stored as bytes in a Hugging Face table point at their files in the audio cache.

``--manifest`` is a path, its format detected, or a spec mapping in YAML / JSON
(``'{path: val.csv, file_template: "Y{youtube_id}"}'``); ``--format``, ``--audio_dir``,
``--file_template``, ``--audio_column``, ``--caption_columns``, ``--id_column`` and
``--audio_cache_dir`` set the spec's fields (see :class:`~datamodules.formats.ManifestSpec`).
Bad rows stop the conversion with the error naming the file and row (exit status 1), unless
``--on_bad_sample skip``: then they are left out, counted by reason and the first ones listed. The
output is written under a temporary name and renamed when complete; it may not be the input.
No audio is opened: ``check-data`` checks headers and samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace

import yaml

from datamodules.bad_samples import SkippedSample, count_reasons, format_counts
from datamodules.check import clean_row
from datamodules.formats import FORMATS, ManifestSpec, as_spec, read_spec
from datamodules.manifest import ClipRecord, ManifestError

__all__ = ["convert", "main", "parse_spec", "write_jsonl"]

#: the spec fields the command line sets, besides the path.
_SPEC_OPTIONS = ("format", "audio_dir", "file_template", "audio_column", "caption_columns", "id_column",
                 "audio_cache_dir")  # fmt: skip


def parse_spec(manifest: str, **options: object) -> ManifestSpec:
    """The spec of ``--manifest`` (a path, or a mapping in YAML / JSON) with the given options set."""
    value = yaml.safe_load(manifest) if manifest.lstrip().startswith("{") else manifest
    spec = as_spec(value)
    given = {name: value for name, value in options.items() if value is not None}
    return replace(spec, **given) if given else spec


def write_jsonl(records: list[ClipRecord], output: str) -> None:
    """Write ``records`` as JSONL rows, atomically (a temporary file renamed when complete)."""
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    handle, scratch = tempfile.mkstemp(prefix=f".{os.path.basename(output)}-", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(clean_row(record), ensure_ascii=False) + "\n")
        os.replace(scratch, output)
    except BaseException:
        if os.path.exists(scratch):
            os.remove(scratch)
        raise


def convert(spec: ManifestSpec, output: str, skip: bool = False) -> tuple[list[ClipRecord], list[SkippedSample]]:
    """Read ``spec`` and write its records to ``output`` as JSONL; the records and the rows skipped.

    Raises:
        ValueError: ``output`` is the input, or is a folder.
        ManifestError: the manifest cannot be read, or (unless ``skip``) a row is bad.
    """
    source, target = os.path.abspath(spec.path), os.path.abspath(output)
    if target == source or (os.path.exists(target) and os.path.samefile(target, source)):
        raise ValueError(f"--output {output} is the input manifest; write the JSONL elsewhere")
    if os.path.isdir(target):
        raise ValueError(f"--output {output} is a folder; give a .jsonl file name")
    problems: list[SkippedSample] | None = [] if skip else None
    records = read_spec(spec, problems)
    write_jsonl(records, output)
    return records, problems or []


def main(args: list[str] | None = None) -> int:
    """Run ``convert``; returns the exit status (1 when the manifest could not be converted)."""
    parser = argparse.ArgumentParser(
        prog="main.py convert",
        description="Write a manifest of any supported format (Clotho / AudioCaps CSV, WavCaps JSON, "
        "Hugging Face parquet / save_to_disk, NLI CSV, JSON list, JSONL) as a JSONL manifest.",
    )
    parser.add_argument("--manifest", required=True, help="path (format detected) or a spec mapping in YAML/JSON")
    parser.add_argument("--output", required=True, metavar="OUT.jsonl", help="the JSONL manifest to write")
    parser.add_argument("--format", choices=FORMATS, help="the manifest's format (default: detected)")
    parser.add_argument("--audio_dir", help="folder the rows' audio names are relative to")
    parser.add_argument("--file_template", help='audio file name from a row\'s fields, e.g. "Y{youtube_id}"')
    parser.add_argument("--audio_column", help="Hugging Face table: the audio column (default audio)")
    parser.add_argument("--caption_columns", nargs="+", help="Hugging Face table: the caption columns, in order")
    parser.add_argument("--id_column", help="Hugging Face table: the clip id column")
    parser.add_argument("--audio_cache_dir", help="Hugging Face table: where audio bytes are written out")
    parser.add_argument("--on_bad_sample", choices=("error", "skip"), default="error",
                        help="error: stop at the first bad row; skip: leave bad rows out and count them")
    parser.add_argument("--max_problems", type=int, default=20, help="skipped rows listed in full")
    options = parser.parse_args(args)
    try:
        spec = parse_spec(options.manifest, **{name: getattr(options, name) for name in _SPEC_OPTIONS})
        records, skipped = convert(spec, options.output, skip=options.on_bad_sample == "skip")
    except (ManifestError, ValueError, TypeError) as err:
        print(f"convert: {err}", file=sys.stderr)
        return 1
    for problem in skipped[: options.max_problems]:
        print(f"  {problem.source}  {problem.reason}  {problem.path or '-'}", file=sys.stderr)
    captions = sum(len(record.captions) for record in records)
    print(f"wrote {len(records)} clips ({captions} captions) to {options.output}; "
          f"skipped {len(skipped)} rows ({format_counts(count_reasons(skipped))})")  # fmt: skip
    return 0
