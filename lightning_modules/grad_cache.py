"""Pieces of the GradCache step: chunking collated inputs and replaying random state."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def split_inputs(inputs: dict[str, torch.Tensor], chunk_size: int) -> list[dict[str, torch.Tensor]]:
    """Split collated backbone inputs into chunks of ``chunk_size`` rows.

    Every tensor is sliced along its first dimension, then token columns that are padding in every
    row of the chunk are dropped, so a chunk equals what collating its items alone would give.
    Audio tensors must have one row per item, which holds because each side of a batch has a
    single modality.
    """
    rows = inputs["input_ids"].shape[0]
    for key, value in inputs.items():
        if value.shape[0] != rows:
            raise ValueError(f"input {key!r} has {value.shape[0]} rows, input_ids has {rows}")
    chunks = []
    for start in range(0, rows, chunk_size):
        chunk = {key: value[start : start + chunk_size] for key, value in inputs.items()}
        real = chunk["attention_mask"].bool().any(dim=0)
        columns = real.nonzero().flatten()
        keep = slice(int(columns.min()), int(columns.max()) + 1)
        chunk["input_ids"] = chunk["input_ids"][:, keep]
        chunk["attention_mask"] = chunk["attention_mask"][:, keep]
        chunks.append(chunk)
    return chunks


@dataclass
class RngState:
    """CPU and CUDA generator states, captured before a chunk's first pass and restored for its
    second, so dropout draws the same masks both times."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor]

    @classmethod
    def capture(cls) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)
