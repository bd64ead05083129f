"""Precision and memory settings: bf16 training through the trainer, activation checkpointing, SDPA."""

import pytest
import torch
from lightning import Trainer
from torch.utils.data import DataLoader

from builders import quiet_trainer, tiny_module, tone_pairs, trainable_parts
from lightning_modules import EmbeddingModule
from lightning_modules.adapters import LoraSettings

LORA = LoraSettings(r=4, dropout=0.0)


def examples() -> list[dict]:
    return tone_pairs()


def module(kind: str, **backbone_options) -> EmbeddingModule:
    # LoRA B starts at zero, which leaves A without gradient.
    return tiny_module(kind, manual_seed=0, backbone=dict(lora=LORA, **backbone_options), **trainable_parts(),
                       lora_b_std=0.1)


def fit(model: EmbeddingModule, precision: str, steps: int = 1) -> Trainer:
    trainer = quiet_trainer(precision=precision, max_steps=steps, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(model, DataLoader([model.collate(examples()[:2])] * steps, batch_size=None))
    return trainer


@pytest.mark.parametrize("kind", ["qwen", "midashenglm"])
def test_bf16_mixed_training_step(kind):
    model = module(kind, gradient_checkpointing=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer = fit(model, "bf16-mixed")
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("kind", ["qwen", "midashenglm"])
def test_bf16_mixed_with_bfloat16_weights_keeps_trainable_weights_float32(kind):
    """The recommended bf16 setup (``dtype: bfloat16`` and ``bf16-mixed``): frozen weights are
    bfloat16; adapters, head and τ, and AdamW's moments, stay float32, and over 3 steps every
    one of their entries moves (``bf16-true`` moved 19 % of the LoRA A entries and τ not at all)."""
    model = module(kind, dtype="bfloat16", freeze_audio_encoder=True)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    assert "loss.temperature.log_scale" in trainable and any("lora_A" in n for n in trainable)
    trainer = fit(model, "bf16-mixed", steps=3)
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    params = dict(model.named_parameters())
    for name, before in trainable.items():
        assert params[name].dtype == torch.float32, name
        assert bool((params[name] != before).all()), name
    states = trainer.optimizers[0].state.values()
    assert states and all(s[k].dtype == torch.float32 for s in states for k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
@pytest.mark.parametrize("kind", ["qwen", "midashenglm"])
def test_true_half_precision_training_is_refused(kind, precision):
    """Lightning's true half precisions would train the adapters, head and τ in half precision: the
    first training forward pass stops with the reason and the setting to use instead."""
    model = module(kind)
    with pytest.raises(RuntimeError, match="--trainer.precision bf16-mixed with --model.backbone.init_args.dtype"):
        fit(model, precision)


def test_midashenglm_refuses_a_rounded_waveform_and_bf16_mixed_keeps_it_float32():
    """Under ``bf16-mixed`` with bfloat16 weights the mel front end receives the collated float32
    waveform unchanged; under ``bf16-true`` (inference, which is allowed) Lightning would hand it a
    bfloat16 copy, which the backbone refuses."""
    model = module("midashenglm", dtype="bfloat16")
    batch = model.collate(examples()[:2])
    seen = []
    front_end = model.backbone.model.audio_encoder.front_end
    front_end.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    trainer = Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False)
    trainer.predict(model, DataLoader([batch], batch_size=None))
    assert len(seen) == 1 and seen[0].dtype == torch.float32
    assert torch.equal(seen[0], batch["query"]["audio"])
    trainer = Trainer(accelerator="cpu", precision="bf16-true", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="MiDashengLM needs the float32 waveform, got torch.bfloat16"):
        trainer.predict(model, DataLoader([batch], batch_size=None))


@pytest.mark.parametrize("kind", ["qwen", "midashenglm"])
def test_activation_checkpointing_gives_the_same_gradients(kind):
    grads = []
    for checkpointing in (False, True):
        model = module(kind, gradient_checkpointing=checkpointing).train()
        batch = model.collate(examples()[:2])
        model.loss(*model.embed_batch(batch), model.batch_info(batch)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and any("lora_A" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(layer.gradient_checkpointing for layer in model.backbone.language_model.layers)


@pytest.mark.parametrize("kind", ["qwen", "midashenglm"])
def test_sdpa_attention_is_the_default(kind):
    """The language models use PyTorch's fused attention; so does Qwen's audio tower (Dasheng's
    attention calls ``scaled_dot_product_attention`` itself)."""
    backbone = module(kind).backbone
    assert backbone.language_model.config._attn_implementation == "sdpa"
    if kind == "qwen":
        assert backbone.audio_encoder.config._attn_implementation == "sdpa"
