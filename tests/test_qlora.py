"""QLoRA (``LoraSettings.quantize_4bit``): NF4 language models with float32 LoRA adapters on top.

Tiny models are quantised in place; the real loaders are exercised on tiny checkpoints written to
disk (Qwen: ``from_pretrained`` with a ``BitsAndBytesConfig``; MiDashengLM: its own loader, then
quantised). bitsandbytes runs NF4 on CPU. The loaded models run in train mode: in eval mode, on
CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for a faster kernel that needs at least
64 (its block size) input features, more than the tiny models' width of 32.
"""

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from builders import tiny_dasheng_model, tiny_module, tone_pairs, trainable_parts
from lightning_modules import EmbeddingModule, MiDashengLMBackbone, QwenOmniThinker
from lightning_modules.adapters import LoraSettings, local_device, quantize_linear_4bit
from lightning_modules.backbones.qwen_omni import tiny_components

QLORA = LoraSettings(r=4, dropout=0.0, quantize_4bit=True, compute_dtype="float32")
#: the linear layers of a Qwen2.5 decoder layer; LoRA wraps q/k/v, keeping the original as base_layer.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def examples() -> list[dict]:
    return tone_pairs()


def module(kind: str, lora: LoraSettings = QLORA) -> EmbeddingModule:
    frozen = {"freeze_audio_encoder": True} if kind == "qwen" else {}
    return tiny_module(kind, manual_seed=0, backbone=dict(lora=lora, **frozen), **trainable_parts())


def base_layers(language_model: nn.Module) -> list[nn.Module]:
    layers = [m for name, m in language_model.named_modules() if name.endswith(PROJECTIONS)]
    return [getattr(m, "base_layer", m) for m in layers]


def assert_quantised(model: nn.Module, settings: LoraSettings) -> None:
    layers = base_layers(model.language_model)
    assert len(layers) == 7 * len(model.language_model.layers)
    for layer in layers:
        assert isinstance(layer, bnb.nn.Linear4bit)
        assert layer.weight.quant_type == "nf4"
        assert layer.weight.compress_statistics == settings.double_quant
        assert layer.weight.dtype == getattr(torch, settings.quant_storage_dtype)
        assert not layer.weight.requires_grad
    # The audio side is not quantised.
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.audio_encoder.modules())


@pytest.mark.parametrize("kind", ["qwen", "midashenglm"])
def test_language_model_linears_are_nf4_and_only_adapters_train(kind):
    settings = LoraSettings(r=4, quantize_4bit=True, double_quant=True, quant_storage_dtype="bfloat16")
    model = module(kind, settings)
    assert_quantised(model.backbone, settings)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {n for n in trainable if "lora_" in n or n.startswith(("head.", "loss."))}
    assert any(n.startswith("head.") for n in trainable) and "loss.temperature.log_scale" in trainable
    # Adapters stay float32 whatever the storage dtype, so AdamW's small updates are not rounded away.
    assert all(p.dtype == torch.float32 for n, p in trainable.items() if "lora_" in n)
    # peft's bitsandbytes LoRA layer wraps the 4-bit base.
    q_proj = model.backbone.language_model.layers[0].self_attn.q_proj
    assert type(q_proj).__module__ == "peft.tuners.lora.bnb"


def assert_runs_where_quantised(loaded) -> None:
    """The loaders quantise on this process's device (the GPU where there is one, as Lightning will
    place the model); the rest of the model and the inputs follow it there, as under the Trainer."""
    device = local_device()
    assert all(layer.weight.device.type == device.type for layer in base_layers(loaded.language_model))
    loaded.to(device)
    inputs = loaded.collator()([examples()[0]["query"], examples()[1]["documents"][0]])
    inputs = {key: value.to(device) for key, value in inputs.items()}
    assert torch.isfinite(loaded.train()(inputs).hidden_states).all()


def test_quantised_layer_keeps_the_weights():
    """NF4 keeps 16 levels per 64-weight block: the output moves by the quantisation error only."""
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(64, 128))
    x = torch.randn(16, 64)
    reference = layers(x)
    quantize_linear_4bit(layers, QLORA)
    assert isinstance(layers[0], bnb.nn.Linear4bit)
    with torch.no_grad():
        assert float((layers(x) - reference).norm() / reference.norm()) < 0.2


def test_qlora_loss_decreases_and_base_stays_frozen():
    """A few AdamW steps on one batch of MiDashengLM with QLoRA (the tiny thinker, slower on CPU,
    learns under QLoRA in tests/test_fsdp.py's runs)."""
    model = module("midashenglm").train()
    batch = model.collate(examples()[:4])
    packed = [layer.weight.detach().clone() for layer in base_layers(model.backbone.language_model)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        out = model.loss(*model.embed_batch(batch), model.batch_info(batch))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.loss.detach()))
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    for before, layer in zip(packed, base_layers(model.backbone.language_model)):
        assert torch.equal(before, layer.weight)


def test_qwen_from_pretrained_loads_nf4(tmp_path):
    """The real path: ``from_pretrained`` with a BitsAndBytesConfig that skips the audio and vision
    towers, then LoRA on the 4-bit layers."""
    thinker, tokenizer, feature_extractor = tiny_components()
    thinker.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    feature_extractor.save_pretrained(tmp_path)
    loaded = QwenOmniThinker(name_or_path=str(tmp_path), lora=QLORA, freeze_audio_encoder=True)
    assert_quantised(loaded, QLORA)
    assert_runs_where_quantised(loaded)


def test_midashenglm_loader_quantises_after_loading(tmp_path):
    from test_midashenglm import write_official_checkpoint

    write_official_checkpoint(tiny_dasheng_model(), tmp_path)
    loaded = MiDashengLMBackbone(name_or_path=str(tmp_path), lora=QLORA)
    assert_quantised(loaded, QLORA)
    assert_runs_where_quantised(loaded)
