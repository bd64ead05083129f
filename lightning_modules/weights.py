"""The trainable weights of a model: what recipes checkpoint, hand over between stages and export."""

from __future__ import annotations

import re

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


def lora_scalings(module: nn.Module) -> dict[str, float]:
    """``{"<layer>.<adapter>": scaling}`` of every LoRA layer (peft's ``alpha / r``, or ``alpha / √r``
    with rsLoRA): what merging an adapter's update ``scaling · B A`` into its base weight needs, and
    what a checkpoint cannot tell from the adapter's shapes alone."""
    from peft.tuners.lora import LoraLayer  # peft pulls in bitsandbytes; import only when asked

    return {
        f"{name}.{adapter}": float(scale)
        for name, layer in module.named_modules()
        if isinstance(layer, LoraLayer)
        for adapter, scale in layer.scaling.items()
    }


_LORA_A = re.compile(r"(?P<layer>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight")


def merge_lora_into(module: nn.Module, state: dict[str, torch.Tensor], scalings: dict[str, float],
                    source: str) -> dict[str, torch.Tensor]:
    """Add an earlier run's LoRA updates ``scaling · B A`` to ``module``'s base weights, in place.

    ``state`` holds the earlier run's trainable weights (``<layer>.lora_A.<adapter>.weight`` and
    ``lora_B``) and ``scalings`` its :func:`lora_scalings`. The update of layer ``L`` goes into
    ``L.base_layer.weight`` when ``module`` has its own adapter on ``L``, else into ``L.weight``;
    ``module``'s own adapters are left as they are, so they train on top of the merged weights (how
    AuroLA moves from its text stage, rank 64, to its audio stage, rank 128). Merging into 4-bit
    weights is refused. Returns the entries of ``state`` that are not LoRA matrices.
    """
    params = dict(module.named_parameters())
    merged: set[str] = set()
    for key in sorted(state):
        match = _LORA_A.fullmatch(key)
        if match is None:
            continue
        layer, adapter = match["layer"], match["adapter"]
        key_b = f"{layer}.lora_B.{adapter}.weight"
        scale = scalings.get(f"{layer}.{adapter}")
        if key_b not in state or scale is None:
            raise ValueError(f"{source}: LoRA weights of {layer} are incomplete (lora_B or its scaling is missing)")
        target = params.get(f"{layer}.base_layer.weight", params.get(f"{layer}.weight"))
        if target is None:
            raise ValueError(f"{source}: the model has no layer {layer} to merge its LoRA update into")
        if not target.is_floating_point() or type(target).__name__ == "Params4bit":
            raise ValueError(f"{source}: cannot merge a LoRA update into the quantised weight of {layer}")
        delta = scale * (state[key_b].double() @ state[key].double())
        if tuple(delta.shape) != tuple(target.shape):
            raise ValueError(f"{source}: LoRA update of {layer} has shape {tuple(delta.shape)}, the weight {tuple(target.shape)}")
        with torch.no_grad():
            target.add_(delta.to(device=target.device, dtype=target.dtype))
        merged |= {key, key_b}
    if any(".lora_magnitude_vector." in key for key in state):
        raise ValueError(f"{source}: DoRA adapters cannot be merged this way")
    return {key: value for key, value in state.items() if key not in merged}
