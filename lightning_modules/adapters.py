"""LoRA / QLoRA settings shared by all backbones."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LoraSettings:
    """LoRA adapters on the language model (peft), with the base weights frozen.

    ALM2Vec: rank 8–16 on ``q_proj``, ``k_proj``, ``v_proj``, dropout 0.05. Omni-Embed-Audio:
    LoRA on the attention projections. AuroLA: LoRA on the language model.

    Args:
        r: adapter rank.
        alpha: scaling numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the adapter input.
        target_modules: names of the linear layers that get adapters.
        quantize_4bit: load the base linear layers as NF4 4-bit (QLoRA, bitsandbytes); real
            checkpoints only.
        double_quant: quantise the quantisation constants too (QLoRA).
        compute_dtype: dtype of the 4-bit matmuls.
        quant_storage_dtype: dtype the packed 4-bit weights are stored in (``bfloat16`` lets FSDP
            shard them with the other parameters).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    quantize_4bit: bool = False
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_storage_dtype: str = "uint8"

    def peft_config(self):
        from peft import LoraConfig  # peft pulls in bitsandbytes; import only when LoRA is used

        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(self.target_modules)
        )

    def bnb_config(self):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            bnb_4bit_quant_storage=getattr(torch, self.quant_storage_dtype),
        )


def add_lora(language_model: nn.Module, settings: LoraSettings) -> None:
    """Inject LoRA adapters into ``language_model`` in place and freeze its other weights."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(settings.peft_config(), language_model)
    for name, param in language_model.named_parameters():
        param.requires_grad = "lora_" in name


def freeze(module: nn.Module) -> None:
    """Stop gradients for every parameter of ``module``."""
    for param in module.parameters():
        param.requires_grad = False
