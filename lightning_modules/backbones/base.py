"""The contract every backbone fulfils: prompts in, last-layer hidden states out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lightning_modules.init_args import RecordsInitArgs
from datamodules.inputs import Collator


@dataclass
class BackboneOutput:
    """Last-layer states of a batch of prompts.

    Attributes:
        hidden_states: ``(B, T, H)`` last-layer hidden states.
        attention_mask: ``(B, T)`` 1 for real tokens, 0 for padding (either side).
        input_ids: ``(B, T)`` the token ids, so poolers can find marker tokens.
        emb_token_id: id of the ``<emb>`` marker token, or ``None`` if the backbone has none.
    """

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor
    input_ids: torch.Tensor
    emb_token_id: int | None = None


class Backbone(RecordsInitArgs, nn.Module, ABC):
    """An audio language model used as an encoder.

    A backbone owns its prompt format and its input processing: :meth:`collator` returns a picklable
    callable that turns a list of :class:`EmbedInput` into model tensors (it runs in data-loader
    workers), and :meth:`forward` maps those tensors to :class:`BackboneOutput`.
    """

    #: sampling rate (Hz) the audio front end expects; the datamodule resamples to it.
    sampling_rate: int
    #: width of the hidden states returned by :meth:`forward`.
    hidden_size: int

    def __init__(self) -> None:
        super().__init__()
        #: names of frozen submodules kept in eval mode (no dropout) even while training.
        self.frozen_in_eval: list[str] = []

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        for name in self.frozen_in_eval:
            self.get_submodule(name).eval()
        return self

    def shard_units(self) -> list[nn.Module]:
        """Blocks that FSDP2 shards as units of their own (decoder layers, audio-encoder blocks), so
        that only one block's full weights are materialised at a time; the rest of the backbone is
        sharded as one root unit. Default: none, the whole backbone is one unit."""
        return []

    @abstractmethod
    def collator(self) -> Collator:
        """A picklable callable building this backbone's input tensors from a list of inputs."""

    @abstractmethod
    def forward(self, inputs: dict[str, torch.Tensor]) -> BackboneOutput:
        """Run the language model over collated inputs."""
