"""``python main.py mine``: hard negatives for the re-ranker, mined with a trained embedding model.

AuroLA trains its re-ranker on one positive and hard negatives per query, precomputed with the
stage-1 embedding model: per clip, the indices of its nearest audio and text neighbours above a
cosine similarity of 0.4 (DESIGN.md section 7). This command does the same for any split::

    python main.py mine --config configs/demo.yaml --ckpt_path runs/demo/.../checkpoints/last.ckpt \\
        [--split train] [--k 20] [--threshold 0.4] [--output mined.jsonl]

Step 1, embed: Lightning ``predict`` of the embedding model over the split's clips with
:class:`~callbacks.prediction_writer.EmbeddingWriter`, so it runs on every device of
``--trainer.devices`` / ``--trainer.strategy`` and shows Lightning's progress bar. The data module
comes from the ``data`` sections of the ``--config`` files plus ``--data.*`` overrides (as
``check-data`` builds it) and the trainer from their ``trainer`` sections plus ``--trainer.*``
overrides (their callbacks and logger are not used). The model is an
:class:`~lightning_modules.module.EmbeddingModule` from a Lightning checkpoint (built from the run's
``config.yaml``, or ``--run_config``) or from an export directory
(:mod:`lightning_modules.tools.export`). The embeddings are kept beside the output
(``mined.embeddings.safetensors`` and ``.json`` for ``mined.jsonl``); ``--embeddings FILE`` skips
this step and mines an existing predict output of the same split.

Step 2, mine (the first process only): for every clip, in chunks of queries with the exact search
of :func:`~lightning_modules.tools.search.topk_search` (never the whole similarity matrix),

- ``audio``: the other clips whose audio is nearest to its audio (audio·audio cosine);
- ``text``: the captions of other clips nearest to its audio (audio·caption cosine);

best first, at most ``k`` each, and only scores ``>= threshold`` (``none``: no threshold). Never
returned: the clip itself and its duplicates, i.e. clips with the same audio file or sharing a
caption with it (compared by :func:`caption_key`: case, spacing and end punctuation ignored), and
every caption of those clips. Such neighbours would be false negatives.

Output, JSON lines in manifest order, one per clip (ids as ``embeddings.json`` writes them)::

    {"id": "clip_7",
     "audio": [{"id": "clip_3", "score": 0.53}, ...],
     "text": [{"id": "clip_9#2", "clip": "clip_9", "text": "a dog barks", "score": 0.48}, ...]}

:func:`datamodules.hard_negatives.read_mined` reads it back for the re-ranker.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from datamodules.manifest import ClipRecord
from lightning_modules.tools.search import ids_path, topk_search

#: AuroLA's similarity threshold for hard negatives.
DEFAULT_THRESHOLD = 0.4
DEFAULT_K = 20

_END_PUNCTUATION = re.compile(r"^[\s.,;:!?]+|[\s.,;:!?]+$")


@dataclass
class PredictOutput:
    """An embeddings file of ``predict`` (see :mod:`callbacks.prediction_writer`), checked against a manifest.

    Attributes:
        audio: ``(N, D)`` one row per clip.
        text: ``(M, D)`` one row per caption.
        text_clip: ``(M,)`` the clip row of each caption.
        clip_ids: the N clip ids.
        text_ids: the M caption ids, ``<clip id>#<caption index>``.
        texts: the M captions.
    """

    audio: torch.Tensor
    text: torch.Tensor
    text_clip: torch.Tensor
    clip_ids: list[str]
    text_ids: list[str]
    texts: list[str]


def read_predict_output(path: str | Path, records: Sequence[ClipRecord]) -> PredictOutput:
    """Read an embeddings file and check that it holds exactly the clips of ``records``, in order.

    Raises:
        ValueError: a tensor or id list is missing, or the ids do not match the manifest or each
            other (the message names the file and the first id that differs).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file() or not ids_path(path).is_file():
        raise FileNotFoundError(f"{path}: need an embeddings file and its {ids_path(path).name} (written by predict)")
    with safe_open(str(path), framework="pt") as handle:
        missing = sorted({"audio", "text", "text_clip"} - set(handle.keys()))
        if missing:
            raise ValueError(f"{path} has no tensor {missing}; it is not a predict output")
        audio, text, text_clip = (handle.get_tensor(key) for key in ("audio", "text", "text_clip"))
    sides = json.loads(ids_path(path).read_text(encoding="utf-8"))
    try:
        clip_ids, text_ids, texts = sides["audio"]["ids"], sides["text"]["ids"], sides["text"]["texts"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{ids_path(path)} lacks {err}: need audio.ids, text.ids and text.texts") from None

    for row, (found, record) in enumerate(zip_longest(clip_ids, records)):
        if record is None:
            raise ValueError(f"{ids_path(path)}: clip {found!r} (row {row}) is not in the manifest, "
                             f"which ends after {len(records)} clips")
        if found != record.id:
            where = "ends" if found is None else f"has clip {found!r}"
            raise ValueError(
                f"{ids_path(path)}: row {row} {where} where the manifest has clip {record.id!r} ({record.source}); "
                "the embeddings are not of this split (or a clip was skipped as bad while embedding)"
            )
    if audio.shape[0] != len(clip_ids):
        raise ValueError(f"{path}: {audio.shape[0]} audio rows for the {len(clip_ids)} ids of {ids_path(path)}")
    if not (text.shape[0] == text_clip.shape[0] == len(text_ids) == len(texts)):
        raise ValueError(f"{path}: {text.shape[0]} text rows, {text_clip.shape[0]} text_clip entries, "
                         f"{len(text_ids)} text ids and {len(texts)} texts in {ids_path(path)}")
    caption_index: dict[int, int] = defaultdict(int)
    previous = 0
    for text_id, clip in zip(text_ids, text_clip.tolist()):
        expected = f"{clip_ids[clip]}#{caption_index[clip]}" if 0 <= clip < len(clip_ids) else None
        if expected is None or text_id != expected or clip < previous:
            raise ValueError(f"{ids_path(path)}: text id {text_id!r} does not follow the clips in order "
                             f"(expected {expected!r}); the file is not a predict output")
        caption_index[clip] += 1
        previous = clip
    return PredictOutput(audio, text, text_clip, list(clip_ids), list(text_ids), list(texts))


def caption_key(text: str) -> str:
    """The form in which two captions count as identical: case-folded, single-spaced, no end punctuation."""
    return _END_PUNCTUATION.sub("", " ".join(text.casefold().split()))


def duplicate_clips(texts: Sequence[str], text_clip: Sequence[int], audio_paths: Sequence[str]) -> list[list[int]]:
    """Per clip, the sorted rows of the clips that duplicate it, itself included.

    A duplicate has the same audio file or shares a caption (by :func:`caption_key`).
    """
    groups: dict[tuple[str, str], set[int]] = defaultdict(set)
    for clip, text in zip(text_clip, texts):
        groups["caption", caption_key(text)].add(clip)
    for clip, audio_path in enumerate(audio_paths):
        groups["audio", os.path.realpath(audio_path)].add(clip)
    keys_of_clip: list[set[tuple[str, str]]] = [set() for _ in audio_paths]
    for key, clips in groups.items():
        for clip in clips:
            keys_of_clip[clip].add(key)
    return [sorted({c for key in keys for c in groups[key]}) for keys in keys_of_clip]


def check_settings(k: int, threshold: float | None) -> None:
    """Reject a ``k`` below 1 and a cosine threshold outside [-1, 1]."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if threshold is not None and not -1.0 <= threshold <= 1.0:  # also rejects NaN
        raise ValueError(f"threshold must be a cosine similarity in [-1, 1] (or none), got {threshold}")


def mine_negatives(
    embeddings: PredictOutput,
    audio_paths: Sequence[str],
    k: int = DEFAULT_K,
    threshold: float | None = DEFAULT_THRESHOLD,
    chunk_size: int = 4096,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Iterator[dict[str, Any]]:
    """Yield the output record of every clip, in order (see the module docstring).

    Queries are searched ``chunk_size`` clips at a time. Each chunk asks
    :func:`~lightning_modules.tools.search.topk_search` for ``k`` plus the most candidates any of
    its clips excludes, so ``k`` survive the exclusions whenever the corpus has them; the scores
    and their order are those of the exact search (float32 cosine, ties by corpus row).

    Args:
        embeddings: the split's predict output.
        audio_paths: the audio file of every clip (clips sharing one are duplicates).
        k: negatives per side and clip, at most.
        threshold: keep only scores ``>=`` this; ``None`` keeps all.
        chunk_size: queries per chunk and corpus rows per matrix product of the search.
        device: where the similarities are computed.
        progress: show a progress bar over the query chunks.
    """
    check_settings(k, threshold)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    audio = F.normalize(embeddings.audio.to(device, torch.float32), dim=-1)
    text = F.normalize(embeddings.text.to(device, torch.float32), dim=-1)
    text_clip = embeddings.text_clip.tolist()
    duplicates = duplicate_clips(embeddings.texts, text_clip, audio_paths)
    rows_of_clip: list[list[int]] = [[] for _ in embeddings.clip_ids]
    for row, clip in enumerate(text_clip):
        rows_of_clip[clip].append(row)
    excluded_text = [[row for clip in dups for row in rows_of_clip[clip]] for dups in duplicates]
    count = audio.shape[0]
    with tqdm(total=count, desc="mining", unit="clip", disable=not progress) as bar:
        for start in range(0, count, chunk_size):
            stop = min(start + chunk_size, count)
            queries = audio[start:stop]
            audio_hits = _search(queries, audio, k, duplicates[start:stop], chunk_size)
            text_hits = _search(queries, text, k, excluded_text[start:stop], chunk_size)
            for offset, (clip_hits, caption_hits) in enumerate(zip(audio_hits, text_hits)):
                yield {
                    "id": embeddings.clip_ids[start + offset],
                    "audio": [{"id": embeddings.clip_ids[j], "score": s} for j, s in _keep(clip_hits, k, threshold)],
                    "text": [
                        {"id": embeddings.text_ids[r], "clip": embeddings.clip_ids[text_clip[r]],
                         "text": embeddings.texts[r], "score": s}
                        for r, s in _keep(caption_hits, k, threshold)
                    ],
                }
            bar.update(stop - start)


def _search(
    queries: torch.Tensor, corpus: torch.Tensor, k: int, excluded: list[list[int]], chunk_size: int
) -> list[list[tuple[int, float]]]:
    """Per query, its best corpus rows ``(row, score)``, best first, without its excluded rows."""
    if corpus.shape[0] == 0:
        return [[] for _ in excluded]
    extra = max(len(rows) for rows in excluded)
    scores, indices = topk_search(queries, corpus, k + extra, chunk_size)
    hits = []
    for row_scores, row_indices, rows in zip(scores.tolist(), indices.tolist(), excluded):
        skip = set(rows)
        hits.append([(i, s) for i, s in zip(row_indices, row_scores) if i not in skip])
    return hits


def _keep(hits: list[tuple[int, float]], k: int, threshold: float | None) -> list[tuple[int, float]]:
    kept = []
    for index, score in hits:
        if len(kept) == k or (threshold is not None and score < threshold):
            break  # best first: every later score is lower
        kept.append((index, score))
    return kept


def write_mined(records: Iterator[dict[str, Any]], path: str | Path) -> dict[str, Any]:
    """Write the records as JSON lines (complete or not at all) and return counts for the summary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    clips, totals, empty = 0, {"audio": 0, "text": 0}, {"audio": 0, "text": 0}
    with open(partial, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            clips += 1
            for side in totals:
                totals[side] += len(record[side])
                empty[side] += not record[side]
    os.replace(partial, path)
    return {
        "output": str(path),
        "clips": clips,
        **{f"{side}_mean": totals[side] / max(clips, 1) for side in totals},
        **{f"{side}_none": empty[side] for side in empty},
    }


def load_module(ckpt_path: str | Path, run_config: str | Path | None = None):
    """The :class:`EmbeddingModule` of a Lightning checkpoint or of an export directory, in eval mode."""
    from lightning_modules.module import EmbeddingModule
    from lightning_modules.tools.encoder import load_embedding_module
    from lightning_modules.tools.export import CONFIG_NAME, load_components

    path = Path(ckpt_path)
    if not path.is_dir():
        return load_embedding_module(path, run_config)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{path} is a folder without {CONFIG_NAME}, so not an export directory; a sharded (FSDP) checkpoint "
            "must be exported first (python main.py export)"
        )
    if run_config is not None:
        raise ValueError(f"--run_config is for checkpoints; the export {path} carries its own {CONFIG_NAME}")
    backbone, pooler, head, _ = load_components(path)
    weights = head.state_dict()
    module = EmbeddingModule(backbone, pooler, head)
    module.head.load_state_dict(weights)  # the module builds its head anew for the backbone's width
    return module.eval()


def _trainer_kwargs(configs: Sequence[str], overrides: Sequence[str]) -> dict[str, Any]:
    """Trainer arguments of the configs' ``trainer`` sections (without callbacks and logger) and overrides."""
    from jsonargparse import Namespace
    from lightning import Trainer
    from lightning.pytorch.cli import LightningArgumentParser

    parser = LightningArgumentParser(prog="main.py mine", exit_on_error=False)
    parser.add_lightning_class_args(Trainer, "trainer")
    args = []
    for path in configs:
        with open(path, encoding="utf-8") as handle:
            section = (yaml.safe_load(handle) or {}).get("trainer") or {}
        section = {key: value for key, value in section.items() if not key.startswith(("callbacks", "logger"))}
        if section:
            args += ["--trainer", json.dumps(section)]
    config = parser.parse_args(args + list(overrides))
    instantiate = getattr(parser, "instantiate", parser.instantiate_classes)
    kwargs = instantiate(config).trainer
    return dict(kwargs.as_dict() if isinstance(kwargs, Namespace) else kwargs)


def _split_overrides(parser: argparse.ArgumentParser, rest: list[str]) -> tuple[list[str], list[str]]:
    """The ``--data.*`` and the ``--trainer.*`` settings among the arguments argparse did not know."""
    groups: dict[str, list[str]] = {"data": [], "trainer": []}
    current = None
    for arg in rest:
        if arg.startswith("--"):
            current = arg[2:].split(".", 1)[0] if "." in arg else None
            if current not in groups or arg.startswith(("--trainer.callbacks", "--trainer.logger")):
                parser.error(f"unrecognized argument {arg} (besides the options above, only --data.* and "
                             "--trainer.* settings other than callbacks and logger)")
        elif current is None:
            parser.error(f"unrecognized argument {arg}")
        groups[current].append(arg)
    return groups["data"], groups["trainer"]


def _threshold(value: str) -> float | None:
    if value.lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number in [-1, 1] or 'none', got {value!r}") from None


def main(args: list[str] | None = None) -> dict[str, Any] | None:
    """Run ``mine``; returns the summary (on the first process; ``None`` on the others)."""
    parser = argparse.ArgumentParser(
        prog="main.py mine",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Mine hard negatives per clip (nearest other clips and their captions) with an embedding "
        "model, as JSON lines for the re-ranker.",
        epilog="Any --data.* or --trainer.* setting of fit overrides the configs (e.g. --trainer.devices 4 "
        "--trainer.strategy ddp).",
    )
    parser.add_argument("--config", action="append", required=True,
                        help="recipe YAML (its data and trainer sections); repeat to add overlays")
    parser.add_argument("--ckpt_path", default=None,
                        help="Lightning checkpoint of an EmbeddingModule run, or an export directory")
    parser.add_argument("--run_config", default=None,
                        help="the checkpoint's run config (default: config.yaml of its run directory)")
    parser.add_argument("--split", choices=("train", "val", "test"), default="train", help="clips to mine")
    parser.add_argument("--set", default=None, help="named evaluation set of the split, where it has several")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="negatives per clip and side, at most")
    parser.add_argument("--threshold", type=_threshold, default=DEFAULT_THRESHOLD,
                        help="keep only cosine scores >= this (AuroLA: 0.4); 'none' keeps all")
    parser.add_argument("--output", default="mined.jsonl", help="JSON lines to write")
    parser.add_argument("--embeddings", default=None,
                        help="mine this predict output of the split instead of embedding it (step 1 is skipped)")
    parser.add_argument("--chunk_size", type=int, default=4096, help="queries per search chunk (memory)")
    parser.add_argument("--device", default="auto", help="device of the search: auto (cuda when available), cpu, cuda, ...")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar while mining")
    options, rest = parser.parse_known_args(args)
    data_overrides, trainer_overrides = _split_overrides(parser, rest)
    check_settings(options.k, options.threshold)
    if options.ckpt_path is None and options.embeddings is None:
        parser.error("give --ckpt_path (a checkpoint or export to embed with) or --embeddings (a predict output)")

    from datamodules.check import load_datamodule

    datamodule = load_datamodule(options.config, data_overrides)
    datamodule.predict_on(options.split, options.set)
    output = Path(options.output)
    if options.embeddings is not None:
        embeddings_path = Path(options.embeddings)
    else:
        embeddings_path = output.with_name(f"{output.stem}.embeddings.safetensors")
        if not _embed(options, datamodule, trainer_overrides, embeddings_path):
            return None  # mining is the first process's job
    datamodule.prepare_data()  # a generated data set (SyntheticDataModule) names its manifests here
    records = datamodule.predict_records()
    embeddings = read_predict_output(embeddings_path, records)
    device = options.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    mined = mine_negatives(embeddings, [r.audio_path for r in records], options.k, options.threshold,
                           options.chunk_size, device, not options.no_progress)
    summary = write_mined(mined, output)
    summary["embeddings"] = str(embeddings_path)
    threshold = "none" if options.threshold is None else options.threshold
    print(f"mined {summary['clips']} {options.split} clips (k {options.k}, threshold {threshold}) "
          f"into {output}, from {embeddings_path}")
    for side, what in (("audio", "other clips"), ("text", "captions of other clips")):
        print(f"  {side}: {summary[f'{side}_mean']:.2f} negatives per clip ({what}); "
              f"{summary[f'{side}_none']} clips have none")
    return summary


def _embed(options: argparse.Namespace, datamodule, trainer_overrides: list[str], path: Path) -> bool:
    """Step 1: predict the split's embeddings into ``path``; ``True`` on the first process."""
    from lightning import Trainer

    from callbacks.prediction_writer import EmbeddingWriter

    module = load_module(options.ckpt_path, options.run_config)
    datamodule.bind(module.backbone.sampling_rate, module.collate)
    kwargs = _trainer_kwargs(options.config, trainer_overrides)
    writer = EmbeddingWriter(output_dir=str(path.parent), filename=path.name)
    kwargs.update(callbacks=[writer], logger=False, enable_checkpointing=False)
    trainer = Trainer(**kwargs)
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    if not trainer.is_global_zero:
        return False
    if not path.is_file():
        raise RuntimeError(f"predict wrote no embeddings to {path} (every clip skipped as bad?)")
    return True
