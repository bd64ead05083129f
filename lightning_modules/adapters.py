"""LoRA / QLoRA settings shared by all backbones."""

from __future__ import annotations

import os
import sys
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
        quantize_4bit: QLoRA (Dettmers et al., 2023): the language model's linear layers become
            bitsandbytes NF4 ``Linear4bit`` (frozen), with the LoRA adapters on top in float32.
            Qwen checkpoints are quantised while loading, MiDashengLM ones right after, tiny
            models in place. Under FSDP2 the 4-bit weights are not sharded but kept whole on
            every rank (see ``EmbeddingModule.configure_model``).
        double_quant: quantise the quantisation constants too (QLoRA).
        compute_dtype: dtype of the 4-bit matmuls.
        quant_storage_dtype: dtype the packed 4-bit weights are stored in (``uint8``; FSDP1
            recipes use ``bfloat16`` to flatten them with bfloat16 weights, which FSDP2 here does
            not need).
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

    def bnb_config(self, skip_modules: list[str] | None = None):
        """transformers' ``BitsAndBytesConfig`` for NF4 loading; ``skip_modules`` stay unquantised."""
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            bnb_4bit_quant_storage=getattr(torch, self.quant_storage_dtype),
            llm_int8_skip_modules=skip_modules,
        )


def add_lora(language_model: nn.Module, settings: LoraSettings) -> None:
    """Inject LoRA adapters into ``language_model`` in place and freeze its other weights.

    With ``settings.quantize_4bit`` the linear layers must already be ``Linear4bit`` (see
    :func:`quantize_linear_4bit`). This is the part of peft's ``prepare_model_for_kbit_training``
    that matters here: the base weights are frozen and the adapters are kept in float32, so AdamW
    updates are not rounded away in a bfloat16 model (peft's ``get_peft_model`` does the same with
    ``autocast_adapter_dtype``). The rest of that function is left out on purpose: input
    gradients are only needed by reentrant checkpointing, and the backbones use the non-reentrant
    kind; upcasting the frozen norms and embeddings to float32 would change no weight (bfloat16
    values are exact in float32) and the Qwen RMSNorm already computes its statistics in float32,
    while it would cost memory and mix dtypes within FSDP groups. A float32 residual stream is
    available anyway by keeping ``dtype: float32`` and training with ``bf16-mixed`` precision.
    """
    from peft import inject_adapter_in_model

    # peft picks its bitsandbytes LoRA layer only for models flagged as loaded in 4 bit, a flag
    # transformers sets on the top-level model alone.
    language_model.is_loaded_in_4bit = settings.quantize_4bit
    inject_adapter_in_model(settings.peft_config(), language_model)
    for name, param in language_model.named_parameters():
        param.requires_grad = "lora_" in name
        if param.requires_grad:
            param.data = param.data.float()


def local_device() -> torch.device:
    """This process's accelerator (``LOCAL_RANK`` under torchrun, SLURM or Lightning's launcher), or
    the CPU: where quantised weights are placed while loading, before Lightning moves the model."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def quantize_linear_4bit(module: nn.Module, settings: LoraSettings, device: torch.device | None = None) -> None:
    """Replace every ``nn.Linear`` inside ``module`` by a frozen bitsandbytes NF4 ``Linear4bit``
    holding the same weights (QLoRA, Dettmers et al., arXiv 2305.14314).

    For models that are not loaded through ``from_pretrained(quantization_config=...)``: the tiny
    test models and MiDashengLM's own loader. The weights are quantised on ``device`` (default:
    where they lie), which also moves the quantised layers there. Biases keep their dtype.
    """
    import bitsandbytes as bnb

    compute_dtype = getattr(torch, settings.compute_dtype)
    storage_dtype = getattr(torch, settings.quant_storage_dtype)
    linears = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear  # not its subclasses, e.g. an already quantised Linear4bit
    ]
    for parent, name, linear in linears:
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=settings.double_quant,
            quant_type="nf4",
            quant_storage=storage_dtype,
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data,
            requires_grad=False,
            compress_statistics=settings.double_quant,
            quant_type="nf4",
            quant_storage=storage_dtype,
            module=quantized,
        )._quantize(device or linear.weight.device)
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data.to(quantized.weight.device), requires_grad=False)
        setattr(parent, name, quantized)


def quantized_parameters(module: nn.Module) -> set[nn.Parameter]:
    """The bitsandbytes 4-bit weights inside ``module`` (none unless bitsandbytes was imported)."""
    if "bitsandbytes" not in sys.modules:
        return set()
    from bitsandbytes.nn import Params4bit

    return {param for param in module.parameters() if isinstance(param, Params4bit)}


def freeze(module: nn.Module) -> None:
    """Stop gradients for every parameter of ``module``."""
    for param in module.parameters():
        param.requires_grad = False
