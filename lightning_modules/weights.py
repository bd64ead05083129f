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


def checkpoint_keys(module: nn.Module) -> set[str]:
    """State-dict keys a training checkpoint of ``module`` keeps: the trainable parameters and the
    buffers (small; running statistics may change in training).

    Frozen weights are left out: rebuilding the model from its config brings them back (from the
    backbone's own checkpoint, or from the seed for a tiny random backbone), so a LoRA run's
    checkpoint does not carry a copy of the 7B base model.
    """
    trainable = {name for name, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    return trainable | {name for name, _ in module.named_buffers(remove_duplicate=False)}


def check_checkpoint_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise ``ValueError`` unless ``state`` holds every trainable parameter of ``module`` and no key
    ``module`` lacks; frozen weights may be missing (see :func:`checkpoint_keys`)."""
    trainable = {name for name, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    missing = sorted(trainable - set(state))
    unexpected = sorted(set(state) - set(module.state_dict()))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit the model: missing trainable weights {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unknown keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}"
        )


def estimated_checkpoint_bytes(module: nn.Module) -> int:
    """Size of one training checkpoint of ``module`` under AdamW, overhead aside: the trainable
    weights and their two moments (both of the weight's dtype), plus the saved (persistent) buffers."""
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    buffers = {name for name, _ in module.named_buffers(remove_duplicate=False)}
    saved = sum(t.numel() * t.element_size() for name, t in module.state_dict().items() if name in buffers)
    return 3 * trainable + saved
