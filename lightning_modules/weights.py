"""The trainable weights of a model: what recipes checkpoint, hand over between stages and export."""

from __future__ import annotations

import torch
from torch import nn


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU copies of every parameter with ``requires_grad``, keyed by name.

    Sharded parameters (FSDP2 DTensors) are gathered, so every rank must call this together.
    """
    out = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        out[name] = tensor.cpu().clone()
    return out


def load_trainable_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy ``state`` into ``module``'s trainable parameters; every key must exist with the same shape
    and every trainable parameter must be covered (no silent partial load)."""
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    wrong = sorted(k for k in set(params) & set(state) if tuple(params[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(
            f"{source} does not match the model's trainable weights: missing {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}, wrong shape {wrong[:20]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(dtype=param.dtype, device=param.device))


def read_trainable_weights(path: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable weights from a ``.safetensors`` export or from a Lightning ``.ckpt`` (whose full state
    dict is narrowed to ``module``'s trainable parameter names)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path} is neither a .safetensors file nor a Lightning checkpoint with a state_dict")
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
