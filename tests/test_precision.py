"""Precision and memory settings: bf16 training through the trainer, activation checkpointing, SDPA."""

import pytest
import torch
from lightning import Trainer
from torch.utils.data import DataLoader

from dist_scripts.train_tiny import examples
from lightning_modules import EmbeddingModule, EmbTokenPooler, LastTokenPooler, LinearHead, MiDashengLMBackbone
from lightning_modules import QwenOmniThinker
from lightning_modules.adapters import LoraSettings
from losses import InfoNCE

LORA = LoraSettings(r=4, dropout=0.0)


def module(kind: str, **backbone_options) -> EmbeddingModule:
    torch.manual_seed(0)
    if kind == "qwen":
        backbone, pooler = QwenOmniThinker(tiny=True, lora=LORA, **backbone_options), EmbTokenPooler()
    else:
        backbone, pooler = MiDashengLMBackbone(tiny=True, lora=LORA, **backbone_options), LastTokenPooler()
    model = EmbeddingModule(backbone, pooler, LinearHead(16), InfoNCE(learnable_temperature=True))
    # LoRA B starts at zero, which leaves A without gradient.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("kind", ["qwen", "midashenglm"])
def test_bf16_training_step(kind, precision):
    model = module(kind, gradient_checkpointing=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer = Trainer(accelerator="cpu", precision=precision, fast_dev_run=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader([model.collate(examples()[:2])], batch_size=None))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n].float()) for n in before)
    if precision == "bf16-true":
        assert after["head.proj.weight"].dtype == torch.bfloat16


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
