"""The contract every backbone fulfils: prompts in, last-layer hidden states out.

Adding a backbone (say Qwen2-Audio) means one file with a :class:`Backbone` subclass that loads the
model and its tokenizer (real checkpoint or a tiny random one of the same architecture), declares
the parts below, builds its inputs (:meth:`Backbone.collator`) and runs :meth:`Backbone.forward`,
then calls :meth:`Backbone.setup_training`; plus a config naming it by ``class_path``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from datamodules.inputs import Collator
from lightning_modules.adapters import LoraSettings, add_lora, freeze, local_device, quantize_linear_4bit
from lightning_modules.init_args import RecordsInitArgs

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


def parse_dtype(name: str) -> torch.dtype:
    """``"float32"``, ``"bfloat16"``, ... as a ``torch.dtype``."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use e.g. 'float32' or 'bfloat16'")
    return dtype


class Backbone(RecordsInitArgs, nn.Module, ABC):
    """An audio language model used as an encoder (and, through :attr:`output_head`, as a scorer).

    A backbone owns its prompt format and its input processing: :meth:`collator` returns a picklable
    callable that turns a list of :class:`~datamodules.inputs.EmbedInput` into model tensors (it runs
    in data-loader workers), and :meth:`forward` maps those tensors to :class:`BackboneOutput`.

    The base class does the setup every backbone shares: the choice between a real checkpoint
    (``name_or_path``) and a tiny random model (``tiny``), dtype parsing (:attr:`param_dtype`), and in
    :meth:`setup_training` activation checkpointing, freezing the parameters no loss reaches (DDP's
    reducer refuses trainable parameters without gradients), QLoRA quantisation, LoRA and freezing
    the audio path. Everything other code relies on is declared here.

    Trainable weights (adapters, unfrozen towers) and their optimiser state must stay float32 while
    frozen weights may be bfloat16 (``dtype``) under ``bf16-mixed`` autocast; a training forward pass
    under Lightning's ``bf16-true`` / ``16-true``, which cast every weight, is refused.

    Args:
        name_or_path: hub id or local directory of a real checkpoint.
        tiny: build a tiny random model of the same architecture instead (tests, the CPU demo).
        dtype: parameter dtype name.
    """

    #: sampling rate (Hz) the audio front end expects; the datamodule resamples to it.
    sampling_rate: int
    #: width of the hidden states returned by :meth:`forward`.
    hidden_size: int
    #: id of the embedding marker token, if the prompts end with one (``None`` otherwise).
    emb_token_id: int | None = None

    def __init__(self, name_or_path: str | None, tiny: bool, dtype: str = "float32") -> None:
        super().__init__()
        if tiny == (name_or_path is not None):
            raise ValueError(f"{type(self).__name__} needs exactly one of name_or_path or tiny=True")
        #: the real checkpoint, or ``None`` for a tiny model.
        self.name_or_path = name_or_path
        #: a tiny random-init model (its weights exist nowhere else: exports carry them).
        self.tiny = tiny
        #: the dtype the weights are loaded in.
        self.param_dtype = parse_dtype(dtype)
        #: names of frozen submodules kept in eval mode (no dropout) even while training.
        self.frozen_in_eval: list[str] = []
        self.register_forward_pre_hook(_refuse_half_precision_training)

    @property
    @abstractmethod
    def language_model(self) -> nn.Module:
        """The text decoder: where LoRA goes, and what activation checkpointing recomputes."""

    @property
    @abstractmethod
    def audio_encoder(self) -> nn.Module:
        """The audio tower."""

    @property
    @abstractmethod
    def tokenizer(self):
        """The tokenizer the prompts are built with."""

    @property
    def output_head(self) -> nn.Module | None:
        """The language model's (frozen) vocabulary projection, for scoring answer tokens (the
        re-ranker); ``None`` when the backbone was built without it."""
        return None

    @abstractmethod
    def audio_modules(self) -> list[str]:
        """Names of the submodules of the audio path, frozen together by ``freeze_audio_encoder``."""

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters no embedding ever depends on (e.g. an LM head); frozen by :meth:`setup_training`."""
        return []

    def setup_training(
        self,
        lora: LoraSettings | None,
        freeze_audio_encoder: bool,
        gradient_checkpointing: bool,
        quantized_at_load: bool = False,
    ) -> None:
        """The shared part of every backbone's construction; call it once the model is loaded.

        Args:
            lora: LoRA adapters on :attr:`language_model` (its base weights are then frozen); with
                ``lora.quantize_4bit`` its linear layers become NF4 first (QLoRA), unless the loader
                already quantised them (``quantized_at_load``).
            freeze_audio_encoder: freeze the :meth:`audio_modules` and keep them in eval mode.
            gradient_checkpointing: recompute the language model's activations in the backward pass
                (non-reentrant; composes with FSDP2, whose hooks stay outside the recomputed region).
        """
        for param in self.unused_parameters():
            param.requires_grad_(False)
        if gradient_checkpointing:
            self.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora is not None:
            if lora.quantize_4bit and not quantized_at_load:
                quantize_linear_4bit(self.language_model, lora, None if self.tiny else local_device())
            add_lora(self.language_model, lora)
        if freeze_audio_encoder:
            for name in self.audio_modules():
                freeze(self.get_submodule(name))
                self.frozen_in_eval.append(name)
            self.train(self.training)

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
    def collator(self, generation_prompt: bool = False) -> Collator:
        """A picklable callable building this backbone's input tensors from a list of inputs.

        With ``generation_prompt``, each input is one user turn followed by the opening of the
        assistant turn, so the last position's next-token logits (:attr:`output_head`) are the
        model's answer; an input's text may then place its audio with
        :data:`~datamodules.inputs.AUDIO_SLOT` (without it the audio comes first).
        """

    @abstractmethod
    def forward(self, inputs: dict[str, torch.Tensor]) -> BackboneOutput:
        """Run the language model over collated inputs."""

    @abstractmethod
    def forward_shared_prefix(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last-layer states ``(N, H)`` at each row's last real token, for collated prompts that share
        a prefix holding all their audio (one query, N candidates): the prefix runs once, with a
        key/value cache, and the N remainders run batched on top of it (see
        :func:`shared_prefix_split`). Equal to reading :meth:`forward` at the same positions, up to
        float round-off."""


def shared_prefix_split(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The longest run of leading real tokens all rows share, and each row's remaining tokens.

    Rows are prompts that differ only after a common prefix (one query, several candidates); padding
    on either side is ignored. At least one token of every row stays in its remainder, so every row
    has an answer position of its own.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    rows = [ids[i][mask[i]] for i in range(ids.shape[0])]
    shortest = min(len(row) for row in rows)
    same = torch.stack([row[:shortest] == rows[0][:shortest] for row in rows]).all(0)
    length = int(same.long().cumprod(0).sum()) if shortest else 0
    length = min(length, shortest - 1)
    return rows[0][:length], [row[length:] for row in rows]


def pad_right(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, mask)`` of token rows."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=rows[0].dtype, device=rows[0].device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=rows[0].device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def output_cache(output):
    """The key/value cache of a transformers model output (``cache``, formerly ``past_key_values``)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def cache_keyword(forward) -> str:
    """transformers renamed ``past_key_values`` to ``cache``; the name this version takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
