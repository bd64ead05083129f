"""The contract every backbone fulfils: prompts in, last-layer hidden states out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lightning_modules.init_args import RecordsInitArgs
from lightning_modules.inputs import EmbedInput

Collator = Callable[[list[EmbedInput]], dict[str, torch.Tensor]]

#: why training under Lightning's "true" half precisions is refused, and what to use instead.
HALF_PRECISION_TRAINING = (
    "training with precision 'bf16-true' or '16-true' is not supported: Lightning casts every weight to "
    "half precision, the trainable LoRA adapters, head and temperature included, and AdamW's state with "
    "them, so that small updates round away (in a 20-step probe τ never moved). Use "
    "--trainer.precision bf16-mixed with --model.backbone.init_args.dtype bfloat16: the frozen weights "
    "are then bfloat16 and the trainable weights and the optimiser state float32"
)


def _refuse_half_precision_training(backbone: nn.Module, args: tuple) -> None:
    # Lightning's HalfPrecision plugin sets the default dtype for the forward pass; that, in training
    # mode, is how 'bf16-true' and '16-true' show themselves here (their inference use is allowed).
    if backbone.training and torch.get_default_dtype() in (torch.bfloat16, torch.float16):
        raise RuntimeError(HALF_PRECISION_TRAINING)


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

    Trainable weights (adapters, unfrozen towers) and their optimiser state must stay float32 while
    frozen weights may be bfloat16 (``dtype``) under ``bf16-mixed`` autocast; a training forward pass
    under Lightning's ``bf16-true`` / ``16-true``, which cast every weight, is refused.
    """

    #: sampling rate (Hz) the audio front end expects; the datamodule resamples to it.
    sampling_rate: int
    #: width of the hidden states returned by :meth:`forward`.
    hidden_size: int

    def __init__(self) -> None:
        super().__init__()
        #: names of frozen submodules kept in eval mode (no dropout) even while training.
        self.frozen_in_eval: list[str] = []
        self.register_forward_pre_hook(_refuse_half_precision_training)

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
