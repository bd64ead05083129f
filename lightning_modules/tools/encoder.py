"""Inference-side embedding model: load an export or a Lightning checkpoint, then ``encode``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import soxr
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from datamodules.audio import AudioPolicy, load_audio
from lightning_modules.backbones.base import Backbone
from lightning_modules.tools.export import export_model, find_temperature, load_components
from lightning_modules.heads import Head, IdentityHead
from datamodules.inputs import EmbedInput
from lightning_modules.module import EmbeddingModule
from lightning_modules.poolers import Pooler

#: one audio input of :meth:`EmbeddingModel.encode`: a file path or a mono waveform.
AudioLike = Union[str, os.PathLike, np.ndarray, torch.Tensor]


def load_embedding_module(ckpt_path: str | Path, config: str | Path | None = None) -> EmbeddingModule:
    """An :class:`EmbeddingModule` built from a LightningCLI config and loaded from a checkpoint.

    The model is built from the ``model`` section of ``config`` (the ``config.yaml`` LightningCLI
    saves in the run directory) after seeding with its ``seed_everything``, as the CLI does, so a
    tiny random backbone gets the same initialisation. The checkpoint's ``state_dict`` is then
    loaded; it may leave out frozen weights (they come from the rebuilt base) but never a trainable
    one, and it may hold no tensor the model lacks.

    Args:
        ckpt_path: a Lightning checkpoint (``.ckpt``), read with ``torch.load(weights_only=True)``
            (tensors and plain values only, no arbitrary unpickling).
        config: the run's config; by default ``<log_dir>/config.yaml`` for a checkpoint under
            ``<log_dir>/checkpoints/``.
    """
    from jsonargparse import ArgumentParser
    from lightning import seed_everything

    import losses  # noqa: F401  (so that short class names in the config resolve)

    ckpt_path = Path(ckpt_path)
    config = Path(config) if config is not None else ckpt_path.resolve().parent.parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no run config at {config}; pass config= the run's config.yaml")
    raw = yaml.safe_load(config.read_text())
    seed = raw.get("seed_everything")
    if isinstance(seed, int) and not isinstance(seed, bool):
        seed_everything(seed, verbose=False)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(EmbeddingModule, "model", fail_untyped=False, sub_configs=True)
    module = parser.instantiate_classes(parser.parse_object({"model": raw["model"]})).model

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    module.on_load_checkpoint(checkpoint)
    result = module.load_state_dict(checkpoint["state_dict"], strict=False)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    missing = [k for k in result.missing_keys if k in trainable]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"{ckpt_path} does not fit the model of {config}: unexpected {result.unexpected_keys[:10]}, "
            f"missing trainable {missing[:10]}"
        )
    return module.eval()


class EmbeddingModel(nn.Module):
    """A trained embedding model for inference: backbone → pooler → head → (L2 norm).

    Build it with :meth:`from_pretrained` (a directory written by :meth:`save_pretrained` /
    :func:`~lightning_modules.tools.export.export_model`), :meth:`from_checkpoint` (a Lightning checkpoint
    and its run config) or :meth:`from_module`; then call :meth:`encode`.

    Args:
        backbone: the audio language model.
        pooler: how the hidden states become one vector.
        head: a head already built for ``backbone.hidden_size``; ``None`` for no projection.
        temperature: τ of the training loss, kept so scores can be turned into probabilities
            (``softmax(scores / τ)``); ``None`` when unknown.
    """

    def __init__(
        self, backbone: Backbone, pooler: Pooler, head: Head | None = None, temperature: float | None = None
    ):
        super().__init__()
        self.backbone = backbone
        self.pooler = pooler
        self.head = head if head is not None else IdentityHead()
        self.temperature = temperature

    @property
    def sampling_rate(self) -> int:
        """Rate (Hz) the backbone expects; audio of :meth:`encode` is resampled to it."""
        return self.backbone.sampling_rate

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @classmethod
    def from_module(cls, module: EmbeddingModule) -> EmbeddingModel:
        """Share the parts of a training module (no copy), with its loss temperature."""
        return cls(module.backbone, module.pooler, module.head, find_temperature(module))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None) -> EmbeddingModel:
        """Load a directory written by :meth:`save_pretrained` (see :mod:`lightning_modules.tools.export`)."""
        model = cls(*load_components(directory))
        return model.to(device) if device is not None else model

    @classmethod
    def from_checkpoint(
        cls, ckpt_path: str | Path, config: str | Path | None = None, device: str | torch.device | None = None
    ) -> EmbeddingModel:
        """Load a Lightning checkpoint with its run config (see :func:`load_embedding_module`)."""
        model = cls.from_module(load_embedding_module(ckpt_path, config)).eval()
        return model.to(device) if device is not None else model

    def save_pretrained(self, directory: str | Path, merge_lora: bool = False) -> Path:
        """Export to ``directory``; see :func:`~lightning_modules.tools.export.export_model`."""
        return export_model(self, directory, merge_lora)

    def embed(self, inputs: dict[str, torch.Tensor], modality: str, normalize: bool = True) -> torch.Tensor:
        """Float32 embeddings of collated backbone inputs (the computation of ``EmbeddingModule.embed``)."""
        embeddings = self.head(self.pooler(self.backbone(inputs)), modality).float()
        return F.normalize(embeddings, dim=-1) if normalize else embeddings

    def _waveform(self, audio: AudioLike, sampling_rate: int | None, policy: AudioPolicy) -> np.ndarray:
        if isinstance(audio, (str, os.PathLike)):  # decodes only the head the policy keeps
            return load_audio(os.fspath(audio), self.sampling_rate, policy)
        if isinstance(audio, torch.Tensor):
            audio = audio.detach().cpu().numpy()
        wave = np.ascontiguousarray(audio, dtype=np.float32)
        if wave.ndim != 1:
            raise ValueError(f"audio arrays must be 1-D mono waveforms, got shape {wave.shape}")
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            wave = soxr.resample(wave, sampling_rate, self.sampling_rate, quality="HQ").astype(np.float32)
        return policy.apply(wave, self.sampling_rate, train=False)

    def encode(
        self,
        audio: Sequence[AudioLike] | None = None,
        text: Sequence[str] | None = None,
        instruction: str | Sequence[str | None] | None = None,
        batch_size: int = 8,
        normalize: bool = True,
        max_seconds: float | None = 30.0,
        sampling_rate: int | None = None,
    ) -> torch.Tensor:
        """Embed audio, text, or audio–text pairs; returns a float32 CPU tensor ``(N, D)``.

        With both ``audio`` and ``text``, item ``i`` combines audio ``i`` and text ``i`` (the
        backbone's audio+text prompt). Items are embedded in order, ``batch_size`` at a time, through
        the backbone's collator, in eval mode and without gradients.

        Args:
            audio: file paths (decoded, mixed to mono and resampled to :attr:`sampling_rate`) or mono
                float32 waveforms.
            text: strings.
            instruction: one instruction for every item, or one per item (``None``: none).
            batch_size: items per forward pass.
            normalize: L2-normalise the embeddings (as in training).
            max_seconds: keep the first this-many seconds of each clip (evaluation crop); ``None``
                keeps clips whole (Whisper front ends accept at most 30 s).
            sampling_rate: rate of waveform arrays when it differs from :attr:`sampling_rate`.
        """
        if audio is None and text is None:
            raise ValueError("encode needs audio, text or both")
        if audio is not None and text is not None and len(audio) != len(text):
            raise ValueError(f"pairwise encoding needs as many audios ({len(audio)}) as texts ({len(text)})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        count = len(audio) if audio is not None else len(text)
        single = instruction is None or isinstance(instruction, str)
        instructions = [instruction] * count if single else list(instruction)
        if len(instructions) != count:
            raise ValueError(f"{len(instructions)} instructions for {count} items")
        policy = AudioPolicy(max_seconds)
        collate = self.backbone.collator()
        device = self.device
        # Restore each submodule's own mode afterwards: the parts may be shared with a training module.
        modes = {module: module.training for module in self.modules()}
        self.eval()
        parts = []
        try:
            with torch.no_grad():
                for start in range(0, count, batch_size):
                    items = [
                        EmbedInput(
                            text=text[i] if text is not None else None,
                            audio=self._waveform(audio[i], sampling_rate, policy) if audio is not None else None,
                            instruction=instructions[i],
                        )
                        for i in range(start, min(start + batch_size, count))
                    ]
                    inputs = {k: v.to(device) for k, v in collate(items).items()}
                    parts.append(self.embed(inputs, items[0].modality, normalize).cpu())
        finally:
            for module, training in modes.items():
                module.training = training
        return torch.cat(parts)
