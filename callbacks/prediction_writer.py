"""Writes the embeddings of ``predict`` to a safetensors file with a JSON file of their ids.

Layout of ``<output_dir>/embeddings.safetensors`` (float32, manifest order)::

    audio       (N, D)  one row per clip: the query side of the batches (the audio, or audio +
                        question for audio QA rows)
    text        (M, D)  one row per caption (or answer), clip by clip in manifest order
    text_clip   (M,)    int64, the row of ``audio`` each text belongs to

and ``<output_dir>/embeddings.json`` (safetensors holds tensors only; the ids and texts of a large
corpus would also overflow its 100 MB header)::

    {"audio": {"ids": [clip id, ...], "paths": [audio file, ...], "modalities": ["audio"]},
     "text":  {"ids": ["<clip id>#<caption index>", ...], "texts": [caption, ...], "modalities": ["text"]}}

``paths`` are the clips' audio files as absolute paths (so that ``python main.py serve`` can play
them wherever it is started); they are left out when the dataset's items do not name their files.

Under several processes each rank embeds its share of the manifest; the shares are gathered to rank
0, which sorts them back into manifest order and writes the single pair of files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors.torch import save_file

from datamodules.collate import MAX_DOCS_PER_CLIP
from lightning_modules.tools.search import ids_path

FORMAT = "alm-embed/embeddings"


class EmbeddingWriter(BasePredictionWriter):
    """Collects what ``predict_step`` returns and writes one embeddings file at the end of ``predict``.

    See the module docstring for the file layout. The callback does nothing outside ``predict``.

    Args:
        output_dir: folder of the files; ``None`` writes into the run directory
            (``trainer.log_dir``, e.g. ``runs/demo/lightning_logs/version_3``).
        filename: name of the safetensors file; the ids go to the same name with ``.json``.
    """

    def __init__(self, output_dir: str | None = None, filename: str = "embeddings.safetensors"):
        super().__init__(write_interval="batch")
        if not filename.endswith(".safetensors"):
            raise ValueError(f"filename must end with .safetensors, got {filename!r}")
        self.output_dir = output_dir
        self.filename = filename
        #: path of the last embeddings file written.
        self.path: Path | None = None
        self._batches: list[dict[str, Any]] = []

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._batches = []

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: dict[str, Any] | None,
        batch_indices: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if prediction is None:  # a batch whose clips were all skipped as bad
            return
        self._batches.append(
            {
                "audio": prediction["query"].detach().float().cpu(),
                "clip_index": prediction["query_index"].cpu(),
                "clip_ids": list(prediction["clip_ids"]),
                "audio_paths": list(batch.get("audio_paths", [None] * len(prediction["clip_ids"]))),
                "text": prediction["document"].detach().float().cpu(),
                "document_key": batch["document_key"].cpu(),
                "texts": list(batch["texts"]),
                "modalities": (batch["query_modality"], batch["document_modality"]),
            }
        )

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        batches = self._batches
        self._batches = []
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered = [[] for _ in range(trainer.world_size)] if trainer.is_global_zero else None
            dist.gather_object(batches, gathered, dst=0)
            batches = [b for rank in gathered or [] for b in rank]
        if not trainer.is_global_zero or not batches:
            return
        directory = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        self.path = write_embeddings(batches, directory / self.filename)
        print(f"embeddings written to {self.path} (ids in {ids_path(self.path)})")


def write_embeddings(batches: list[dict[str, Any]], path: Path) -> Path:
    """Merge the collected batches into manifest order and write the two files."""
    clip_index = torch.cat([b["clip_index"] for b in batches])
    clip_order = clip_index.argsort()
    unsorted_ids = [cid for b in batches for cid in b["clip_ids"]]
    clip_ids = [unsorted_ids[int(i)] for i in clip_order]
    unsorted_paths = [audio_file for b in batches for audio_file in b["audio_paths"]]
    audio_paths = [unsorted_paths[int(i)] for i in clip_order]
    row_of_clip = {int(c): row for row, c in enumerate(clip_index[clip_order])}
    # Document keys are clip_index * MAX_DOCS_PER_CLIP + caption index: sorting them gives
    # clip-major, caption-minor order.
    document_key = torch.cat([b["document_key"] for b in batches])
    text_order = document_key.argsort()
    keys = document_key[text_order].tolist()
    text_rows = [row_of_clip[key // MAX_DOCS_PER_CLIP] for key in keys]
    texts = [t for b in batches for t in b["texts"]]
    tensors = {
        "audio": torch.cat([b["audio"] for b in batches])[clip_order].contiguous(),
        "text": torch.cat([b["text"] for b in batches])[text_order].contiguous(),
        "text_clip": torch.tensor(text_rows, dtype=torch.long),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": FORMAT})
    audio: dict[str, Any] = {"ids": clip_ids}
    if None not in audio_paths:
        audio["paths"] = [os.path.abspath(audio_file) for audio_file in audio_paths]
    audio["modalities"] = sorted({b["modalities"][0] for b in batches})
    ids = {
        "audio": audio,
        "text": {
            "ids": [f"{clip_ids[row]}#{key % MAX_DOCS_PER_CLIP}" for row, key in zip(text_rows, keys)],
            "texts": [texts[int(i)] for i in text_order],
            "modalities": sorted({b["modalities"][1] for b in batches}),
        },
    }
    ids_path(path).write_text(json.dumps(ids, ensure_ascii=False) + "\n")
    return path
