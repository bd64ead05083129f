"""GradCache (Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup",
RepL4NLP 2021): a large contrastive batch at the activation memory of one chunk, with the gradients of
the plain full-batch step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from lightning import LightningModule
from torch.nn.parallel import DistributedDataParallel

from lightning_modules.strategies import average_gradients

#: one side of a batch: collated backbone inputs and their modality ("audio", "text", ...).
Side = tuple[dict[str, torch.Tensor], str]
Embed = Callable[[dict[str, torch.Tensor], str], torch.Tensor]


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


class GradCache:
    """Chunked embedding with cached gradients, and the manual optimisation step built on it.

    1. Embed each side in chunks of ``chunk_size`` without a graph, remembering each chunk's RNG state.
    2. Compute the loss on the cached embeddings and backpropagate to them (and to the loss's own
       parameters, e.g. τ).
    3. Re-embed each chunk with a graph under its remembered RNG state and backpropagate the cached
       embedding gradients through it (one chunk's activations at a time).

    The gradients equal the plain full-batch step's (dropout included, thanks to the replayed RNG
    states). Any LightningModule with manual optimisation can use :meth:`step`; :meth:`backward` is
    the optimiser-free part (tests and benchmarks call it directly).

    Args:
        chunk_size: items per forward pass.
    """

    def __init__(self, chunk_size: int):
        if chunk_size < 1:
            raise ValueError(f"grad_cache_chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size

    def backward(
        self,
        embed: Embed,
        sides: Sequence[Side],
        loss_fn: Callable[[list[torch.Tensor]], Any],
        backward: Callable[[torch.Tensor, bool], None] = lambda tensor, last: tensor.backward(),
    ) -> Any:
        """Accumulate the gradients of ``loss_fn(embeddings of every side)`` chunk by chunk.

        ``loss_fn`` returns an object with a ``loss`` tensor (a :class:`~losses.base.LossOutput`), which
        is returned. ``backward(tensor, last)`` runs one backward pass; ``last`` is true only for the
        final one.
        """
        size = self.chunk_size
        chunks = [split_inputs(inputs, size) for inputs, _ in sides]
        states: list[list[RngState]] = [[] for _ in sides]
        cached = []
        with torch.no_grad():
            for side_chunks, side_states, (_, modality) in zip(chunks, states, sides):
                parts = []
                for chunk in side_chunks:
                    side_states.append(RngState.capture())
                    parts.append(embed(chunk, modality))
                cached.append(torch.cat(parts).requires_grad_())
        out = loss_fn(cached)
        backward(out.loss, False)
        replays = [
            (chunk, state, grad, modality)
            for side_chunks, side_states, side_cached, (_, modality) in zip(chunks, states, cached, sides)
            for chunk, state, grad in zip(side_chunks, side_states, side_cached.grad.split(size))
        ]
        for i, (chunk, state, grad, modality) in enumerate(replays):
            state.restore()
            backward((embed(chunk, modality) * grad).sum(), i == len(replays) - 1)
        return out

    def step(self, module: LightningModule, embed: Embed, sides: Sequence[Side],
             loss_fn: Callable[[list[torch.Tensor]], Any]) -> Any:
        """One optimiser step of ``module`` (manual optimisation) on the GradCache gradients.

        Under DDP every backward pass runs without the reducer, and the gradients are averaged over
        the processes once, after the last pass. DDP's reducer expects each backward to reach every
        trainable parameter, but the last pass (the last document chunk) reaches neither the audio
        tower nor τ: letting the reducer run on it left its buckets unfinished, and the next step
        failed ("parameters that were not used in producing the loss") after an optimiser step on
        unsynchronised gradients. (Under FSDP2 the strategy reduces the gradients.)
        """
        strategy = module.trainer.strategy
        no_sync = getattr(strategy, "block_backward_sync", nullcontext)

        def backward(tensor: torch.Tensor, last: bool) -> None:
            module.manual_backward(tensor)
            if last and isinstance(strategy.model, DistributedDataParallel):
                trainable = [p for p in module.parameters() if p.requires_grad]
                average_gradients(trainable, strategy.model.process_group)

        with no_sync():
            out = self.backward(embed, sides, loss_fn, backward)
        optimizer = module.optimizers()
        optimizer.step()
        optimizer.zero_grad()
        module.lr_schedulers().step()
        return out
