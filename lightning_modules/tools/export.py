"""Export a trained embedding model to a directory, and read it back.

An exported directory holds::

    embedding_config.json       how to rebuild the model (see below)
    model.safetensors           tensors that override the rebuilt model, keyed "backbone.…", "head.…",
                                "pooler.…" as in the model's state dict
    adapter_config.json         the LoRA adapter (peft's format), unless there is none or it was merged
    adapter_model.safetensors

``embedding_config.json`` records each component as ``{"class_path": ..., "init_args": {...}}``
(the arguments the backbone, pooler and head were constructed with, captured by
:class:`~lightning_modules.init_args.RecordsInitArgs`; nested settings such as ``PromptTemplates``
and ``LoraSettings`` are written the same way), plus ``normalize``, the loss ``temperature``, the
``embedding_dim``, the backbone's ``sampling_rate`` and a ``weights`` section describing the files.

What ``model.safetensors`` holds:

- always: the head and pooler tensors, the backbone's trainable parameters other than LoRA (for
  example an unfrozen audio tower) and the backbone's buffers (small; running statistics change
  in training);
- ``tiny`` backbones: every backbone tensor. Their base weights are random and no hub id can
  restore them, so the directory carries them (a tiny model is a few MB). Rebuilding from the
  recorded seed would also work for the Qwen thinker, but not for every backbone (the tiny
  MiDashengLM draws from the global RNG), and shipping the tensors does not depend on the
  initialisation code staying the same;
- ``merge_lora=True``: the language model with the LoRA update merged into its weights, every
  tensor of it, so the directory is self-contained for the language model. The audio tower and
  the tokenizer still come from ``name_or_path`` (real checkpoints). The config then records
  ``lora: null`` and no adapter files are written.

The LoRA adapter is written as ``PeftModel.save_pretrained`` writes it for the language model alone:
keys ``base_model.model.<module path>.lora_{A,B}.weight`` and a ``LoraConfig`` with
``base_model_name_or_path`` set, so ``PeftModel.from_pretrained(language_model, directory)`` loads it.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_modules.backbones.base import Backbone
from lightning_modules.heads import Head
from lightning_modules.init_args import RecordsInitArgs
from lightning_modules.poolers import Pooler
from losses.base import Temperature

CONFIG_NAME = "embedding_config.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
FORMAT = "alm-embed/embedding-model"
FORMAT_VERSION = 1
# peft's PeftModel wraps the model as ``base_model.model``; its saved adapter keys carry the prefix.
PEFT_PREFIX = "base_model.model."


def class_path(obj: Any) -> str:
    """Importable dotted path of ``obj``'s class."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def import_class(path: str) -> type:
    """The class named by a dotted path (``package.module.Class``)."""
    module, _, name = path.rpartition(".")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def encode_value(value: Any, where: str) -> Any:
    """A JSON-able form of a constructor argument; components and dataclasses become class_path dicts."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [encode_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: encode_value(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, RecordsInitArgs):
        return component_config(value, where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
        return {"class_path": class_path(value), "init_args": encode_value(fields, where)}
    raise TypeError(f"cannot record {where} = {value!r} ({type(value).__name__}) in {CONFIG_NAME}")


def decode_value(value: Any) -> Any:
    """Inverse of :func:`encode_value`: class_path dicts are instantiated, depth first."""
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"class_path", "init_args"}:
            return import_class(value["class_path"])(**decode_value(value["init_args"]))
        return {k: decode_value(v) for k, v in value.items()}
    return value


def component_config(component: RecordsInitArgs, where: str) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": ...}`` of a component built with recorded arguments."""
    return {"class_path": class_path(component), "init_args": encode_value(component.init_args, where)}


def find_temperature(module: nn.Module) -> float | None:
    """τ of an :class:`EmbeddingModule`'s loss, or the ``temperature`` attribute of an inference model."""
    value = getattr(module, "temperature", None)
    if isinstance(value, (int, float)):
        return float(value)
    loss = getattr(module, "loss", None)
    found = [m for m in loss.modules() if isinstance(m, Temperature)] if isinstance(loss, nn.Module) else []
    return float(found[0]().detach()) if found else None


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    # Sharded (FSDP2 DTensor) parameters are gathered; clones also break weight tying, which
    # safetensors refuses to write.
    tensor = tensor.detach()
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.cpu().contiguous().clone()


def _is_lora_key(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


def _lora_config(language_model: nn.Module | None):
    """The LoraConfig injected into the language model, or ``None`` without LoRA."""
    configs = getattr(language_model, "peft_config", None) or {}
    if len(configs) > 1:
        raise ValueError(f"the language model carries several adapters {sorted(configs)}; export handles one")
    return next(iter(configs.values()), None)


def merged_language_model_state(language_model: nn.Module) -> dict[str, torch.Tensor]:
    """The language model's state with every LoRA update merged into its base weight.

    Keys are those of the same model without adapters (``q_proj.weight``, not
    ``q_proj.base_layer.weight``); the merged weight is ``W + get_delta_weight()`` computed exactly as
    peft's ``merge()`` does, without modifying the model.
    """
    from peft.tuners.lora import LoraLayer

    state = {
        re.sub(r"(^|\.)base_layer\.", r"\1", name): _plain(tensor)
        for name, tensor in language_model.state_dict().items()
        if not _is_lora_key(name)
    }
    with torch.no_grad():
        for name, layer in language_model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            if layer.merged:
                raise ValueError(f"{name} already has its adapter merged; export the model before merging")
            weight = f"{name}.weight" if name else "weight"
            for adapter in layer.active_adapters:
                state[weight].add_(_plain(layer.get_delta_weight(adapter)))
    return state


def _prefix_of(root: nn.Module, child: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is child:
            return name
    raise ValueError("the language model is not a submodule of the backbone")


def export_model(module: nn.Module, directory: str | Path, merge_lora: bool = False) -> Path:
    """Write ``module``'s embedding model (backbone, pooler, head) to ``directory``.

    See the module docstring for the layout. Exporting does not modify ``module``.

    Args:
        module: an :class:`~lightning_modules.module.EmbeddingModule` or an
            :class:`~lightning_modules.tools.encoder.EmbeddingModel` (anything with ``backbone``,
            ``pooler`` and ``head`` built with recorded constructor arguments).
        directory: output folder, created if needed; existing files of the same names are replaced.
        merge_lora: merge the LoRA adapter into the language model and write the merged language
            model instead of the adapter.

    Returns:
        The directory.
    """
    backbone: Backbone = module.backbone
    pooler: Pooler = module.pooler
    head: Head = module.head
    language_model = getattr(backbone, "language_model", None)
    lora = _lora_config(language_model)
    backbone_args = backbone.init_args
    if merge_lora:
        if lora is None:
            raise ValueError("merge_lora=True but the backbone has no LoRA adapter")
        settings = backbone_args.get("lora")
        if getattr(settings, "quantize_4bit", False):
            raise ValueError("cannot merge LoRA into 4-bit base weights without re-quantising; export the adapter")
        backbone_args["lora"] = None  # the rebuilt backbone gets the merged weights, no adapter
    tiny = bool(backbone_args.get("tiny", False))

    state: dict[str, torch.Tensor] = {}
    lm_prefix = _prefix_of(backbone, language_model) + "." if language_model is not None else None
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    parameters = {name for name, _ in backbone.named_parameters()}
    for name, tensor in backbone.state_dict().items():
        if _is_lora_key(name) or (merge_lora and name.startswith(lm_prefix)):
            continue
        if tiny or name in trainable or name not in parameters:
            state[f"backbone.{name}"] = _plain(tensor)
    if merge_lora:
        for name, tensor in merged_language_model_state(language_model).items():
            state[f"backbone.{lm_prefix}{name}"] = tensor
    for part, component in (("pooler", pooler), ("head", head)):
        for name, tensor in component.state_dict().items():
            state[f"{part}.{name}"] = _plain(tensor)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        (directory / name).unlink(missing_ok=True)  # a stale adapter would be loaded with new weights
    has_adapter = lora is not None and not merge_lora
    if has_adapter:
        _save_adapter(language_model, lora, backbone_args.get("name_or_path"), directory)

    config = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "backbone": {"class_path": class_path(backbone), "init_args": encode_value(backbone_args, "backbone")},
        "pooler": component_config(pooler, "pooler"),
        "head": component_config(head, "head"),
        "normalize": True,
        "temperature": find_temperature(module),
        "embedding_dim": head.output_size(backbone.hidden_size),
        "sampling_rate": backbone.sampling_rate,
        "weights": {
            "file": WEIGHTS_NAME,
            "base_weights_included": tiny,
            "language_model_merged": merge_lora,
            "adapter": ADAPTER_WEIGHTS_NAME if has_adapter else None,
        },
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _save_adapter(language_model: nn.Module, lora: Any, base: str | None, directory: Path) -> None:
    from peft import get_peft_model_state_dict

    adapter = get_peft_model_state_dict(language_model)
    save_file({PEFT_PREFIX + k: _plain(v) for k, v in adapter.items()}, str(directory / ADAPTER_WEIGHTS_NAME),
              metadata={"format": "pt"})
    config = copy.deepcopy(lora)
    config.base_model_name_or_path = base
    config.inference_mode = True
    config.save_pretrained(str(directory))


def load_components(directory: str | Path) -> tuple[Backbone, Pooler, Head, float | None]:
    """Rebuild ``(backbone, pooler, head, temperature)`` from an exported directory, in eval mode.

    The backbone is constructed from its recorded arguments (loading ``name_or_path`` for real
    checkpoints), then every tensor of ``model.safetensors`` and the adapter are copied in. Unknown
    or misshapen tensors raise; so does a tiny backbone whose weights the file does not cover.
    """
    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    if config.get("format") != FORMAT or config.get("version") != FORMAT_VERSION:
        raise ValueError(f"{directory / CONFIG_NAME} is not a version {FORMAT_VERSION} {FORMAT} config")
    backbone = decode_value(config["backbone"])
    pooler = decode_value(config["pooler"])
    head = decode_value(config["head"])
    head.build(backbone.hidden_size)

    weights = config["weights"]
    state = load_file(str(directory / weights["file"]))
    parts = {"backbone": backbone, "pooler": pooler, "head": head}
    unknown = sorted(k for k in state if k.split(".", 1)[0] not in parts)
    if unknown:
        raise ValueError(f"{directory / weights['file']} has tensors of no component: {unknown[:10]}")
    for part, component in parts.items():
        sub = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(part + ".")}
        result = component.load_state_dict(sub, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{part} has no tensors {result.unexpected_keys[:10]} found in {weights['file']}")
        missing = [k for k in result.missing_keys if not _is_lora_key(k)]
        if missing and (part != "backbone" or weights["base_weights_included"]):
            raise ValueError(f"{weights['file']} lacks {part} tensors {missing[:10]}")
    if weights["adapter"]:
        _load_adapter(backbone.language_model, directory / weights["adapter"])
    for component in parts.values():
        component.eval()
    return backbone, pooler, head, config.get("temperature")


def _load_adapter(language_model: nn.Module, path: Path) -> None:
    from peft import set_peft_model_state_dict

    adapter = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(path)).items()}
    expected = [name for name, _ in language_model.named_parameters() if _is_lora_key(name)]
    if len(adapter) != len(expected):
        raise ValueError(f"{path} holds {len(adapter)} LoRA tensors, the model has {len(expected)}")
    result = set_peft_model_state_dict(language_model, adapter)
    if result.unexpected_keys:
        raise ValueError(f"{path} has tensors the model's adapter lacks: {result.unexpected_keys[:10]}")


def main(args: list[str] | None = None) -> Path:
    """``python main.py export --ckpt_path CKPT --output DIR``: a checkpoint as a model directory."""
    import argparse

    from lightning_modules.tools.encoder import EmbeddingModel

    parser = argparse.ArgumentParser(
        prog="main.py export", description="Write a trained checkpoint as a directory EmbeddingModel.from_pretrained reads."
    )
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint of an EmbeddingModule run")
    parser.add_argument("--config", default=None, help="the run's config.yaml (default: <log_dir>/config.yaml)")
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--merge_lora", action="store_true", help="merge the LoRA adapter into the language model")
    options = parser.parse_args(args)
    directory = EmbeddingModel.from_checkpoint(options.ckpt_path, options.config).save_pretrained(
        options.output, options.merge_lora
    )
    print(f"exported {options.ckpt_path} to {directory}")
    return directory
