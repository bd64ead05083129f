"""Tiny models, pair examples and data modules that many tests build the same way.

``tests/conftest.py`` exposes the builders as factory fixtures (``tiny_module``, ``tiny_qwen_backbone``,
``tiny_dasheng_backbone``, ``synthetic_datamodule``, ...); module-level helpers and the scripts under
``tests/dist_scripts`` (which run in their own processes) import them from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import Trainer

from datamodules import SyntheticDataModule
from datamodules.inputs import EmbedInput
from lightning_modules import EmbeddingModule, EmbTokenPooler, LastTokenPooler, LinearHead, MiDashengLMBackbone
from lightning_modules import QwenOmniThinker
from lightning_modules.backbones.midashenglm import MiDashengLM, MiDashengLMConfig
from losses import InfoNCE

#: backbone kinds of :func:`tiny_backbone`, with the pooler each is used with in the recipes.
KINDS = ("qwen", "midashenglm")
#: captions of :func:`tone_pairs`, cycled.
TONE_CAPTIONS = ["a low hum", "two short clicks", "a rising chirp", "a siren then a knock", "noise burst",
                 "three beeps", "a falling chirp followed by a buzz", "a chord", "a buzz", "two knocks"]


def _seeded(manual_seed: int | None) -> None:
    if manual_seed is not None:
        torch.manual_seed(manual_seed)


def tiny_qwen_backbone(manual_seed: int | None = None, **overrides: Any) -> QwenOmniThinker:
    """``QwenOmniThinker(tiny=True, **overrides)``; ``manual_seed`` seeds torch's global RNG first
    (the thinker's own weights follow its ``seed`` argument; LoRA and heads follow the global RNG)."""
    _seeded(manual_seed)
    return QwenOmniThinker(tiny=True, **overrides)


def tiny_reranker_backbone(manual_seed: int | None = None, **overrides: Any) -> QwenOmniThinker:
    """The tiny thinker as the re-ranker uses it: with its LM head and without the ``<emb>`` token."""
    return tiny_qwen_backbone(manual_seed, lm_head=True, emb_token=None, **overrides)


def tiny_dasheng_backbone(manual_seed: int | None = None, **overrides: Any) -> MiDashengLMBackbone:
    """``MiDashengLMBackbone(tiny=True, **overrides)``; its weights follow torch's global RNG, which
    ``manual_seed`` seeds first."""
    _seeded(manual_seed)
    return MiDashengLMBackbone(tiny=True, **overrides)


def tiny_dasheng_model(manual_seed: int = 0) -> MiDashengLM:
    """The bare tiny MiDashengLM (no backbone wrapper), in eval mode, with non-trivial BatchNorm
    statistics so that a loader that forgot them would be caught."""
    torch.manual_seed(manual_seed)
    model = MiDashengLM(MiDashengLMConfig.tiny()).eval()
    bn = model.audio_encoder.init_bn
    bn.running_mean.uniform_(-20.0, 0.0)
    bn.running_var.uniform_(50.0, 150.0)
    return model


def tiny_backbone(kind: str, manual_seed: int | None = None, **overrides: Any):
    """A tiny backbone by kind (``"qwen"`` or ``"midashenglm"``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    build = tiny_qwen_backbone if kind == "qwen" else tiny_dasheng_backbone
    return build(manual_seed, **overrides)


def randomize_lora_b(module: torch.nn.Module, std: float = 0.1, per_name_generator: bool = False) -> None:
    """LoRA B starts at zero, which leaves A without gradient and the adapters without effect: draw B
    from N(0, std²), from torch's global RNG or (``per_name_generator``) from a generator seeded by
    each parameter's name length, which gives every process the same values whatever its RNG state."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                generator = torch.Generator().manual_seed(len(name)) if per_name_generator else None
                param.normal_(std=std, generator=generator)


def trainable_parts(out_features: int = 16, **loss_options: Any) -> dict[str, Any]:
    """The head and loss most training tests use: ``LinearHead(16)`` and InfoNCE with a learnable τ
    (``tiny_module(..., **trainable_parts())``)."""
    return {"head": LinearHead(out_features), "loss": InfoNCE(learnable_temperature=True, **loss_options)}


def tiny_module(
    kind: str = "qwen",
    *,
    manual_seed: int | None = None,
    backbone: dict[str, Any] | None = None,
    lora_b_std: float | None = None,
    per_name_generator: bool = False,
    **module_options: Any,
) -> EmbeddingModule:
    """An :class:`EmbeddingModule` on a tiny backbone with the pooler its recipes use (the ``<emb>``
    token for Qwen, the last token for MiDashengLM).

    Args:
        kind: ``"qwen"`` or ``"midashenglm"``.
        manual_seed: seeds torch's global RNG before anything is built.
        backbone: keyword arguments of the backbone (``lora``, ``seed``, ``dtype``, ...).
        lora_b_std: draw LoRA B from N(0, std²) after building (see :func:`randomize_lora_b`).
        per_name_generator: see :func:`randomize_lora_b`.
        **module_options: ``EmbeddingModule`` arguments (``head``, ``loss``, ``pooler``,
            ``grad_cache_chunk_size``, ``learning_rate``, ...); unset ones keep its defaults.
    """
    _seeded(manual_seed)
    module_options.setdefault("pooler", EmbTokenPooler() if kind == "qwen" else LastTokenPooler())
    module = EmbeddingModule(tiny_backbone(kind, **(backbone or {})), **module_options)
    if lora_b_std is not None:
        randomize_lora_b(module, lora_b_std, per_name_generator)
    return module


def tone_pairs(
    n: int = 16, seconds_step: float = 0.1, pitch_step: float = 120.0, captions: list[str] = TONE_CAPTIONS
) -> list[dict]:
    """``n`` audio–caption pair examples (as the datasets give them): clip i is a 0.3-amplitude sine of
    200 + pitch_step·i Hz lasting 0.4 + seconds_step·i s with a little noise, captioned
    ``captions[i % len(captions)]``."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        t = np.arange(int((0.4 + seconds_step * i) * 16000)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (200 + pitch_step * i) * t) + 0.01 * rng.standard_normal(t.size)
        out.append({"query": EmbedInput(audio=wave.astype(np.float32)),
                    "documents": [EmbedInput(text=captions[i % len(captions)])], "clip_index": i})
    return out


def synthetic_datamodule(root: str | Path, module: EmbeddingModule | None = None, **overrides: Any) -> SyntheticDataModule:
    """A small :class:`SyntheticDataModule` under ``root`` (4 train, 4 val and 4 test clips, batches of
    4 unless overridden), bound to ``module``'s sampling rate and collator when given."""
    options = {"num_train": 4, "num_val": 4, "num_test": 4, "batch_size": 4, **overrides}
    datamodule = SyntheticDataModule(root=str(root), **options)
    if module is not None:
        datamodule.bind(module.backbone.sampling_rate, module.collate)
    return datamodule


def quiet_trainer(**overrides: Any) -> Trainer:
    """A CPU Trainer without logger, progress bar or model summary (override any setting)."""
    options = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    return Trainer(**{**options, **overrides})
