"""EmbeddingModule wiring: schedule, loss structure, guide, trainable parameters, stage hand-over."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from builders import trainable_parts
from datamodules import RetrievalDataModule
from lightning_modules import BagOfWordsGuide, EmbeddingModule, LinearHead, LoraSettings
from datamodules.inputs import EmbedInput
from lightning_modules.finetune import warmup_cosine
from lightning_modules.weights import trainable_state_dict
from losses import GuideModelMasker, InfoNCE
from main import EmbeddingCLI

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_warmup_cosine_schedule():
    f = warmup_cosine(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def batch_of(module, captions, tags=None):
    rng = np.random.default_rng(0)
    examples = [
        {"query": EmbedInput(audio=(0.1 * rng.standard_normal(4000)).astype(np.float32)),
         "documents": [EmbedInput(text=c)], "clip_index": i, "caption_kind": "tags" if tags else "caption",
         "tags": tags[i] if tags else []}
        for i, c in enumerate(captions)
    ]
    return module.collate(examples)


def test_guide_scores_reach_the_masker(tiny_module):
    module = tiny_module(loss=InfoNCE(masker=GuideModelMasker(margin=0.1)), guide=BagOfWordsGuide())
    captions = ["a low hum then two clicks", "two clicks then a low hum", "a siren", "a rising chirp"]
    batch = batch_of(module, captions)
    info = module.batch_info(batch)
    guide = info.guide_scores
    # same bag of words -> similarity 1: the two permuted captions are each other's false negatives
    assert guide[0, 1] == pytest.approx(1.0) and guide[0, 2] < 0.5
    out = module.loss(*module.embed_batch(batch), info)
    # rows 0 and 1 drop one candidate each, in both directions: 2 of 12 off-diagonal entries
    assert out.logs["masked_fraction"] == pytest.approx(2 / 12)


def test_tag_clusters_from_file(tmp_path, tiny_module):
    path = tmp_path / "clusters.json"
    path.write_text('{"dog": {"cluster_index": 3}, "barking": {"cluster_index": 3}, "sound": {"cluster_index": null}}')
    module = tiny_module(tag_cluster_file=str(path))
    batch = batch_of(module, ["dog", "barking", "cat"], tags=[["dog"], ["barking", "sound"], ["cat"]])
    clusters = module.batch_info(batch).tag_clusters
    assert clusters[0] == clusters[1] == frozenset({3}) and clusters[2] != clusters[0]


def test_alm2vec_setup_trains_only_lora_qkv_head_and_temperature(tiny_module):
    module = tiny_module("midashenglm", backbone=dict(freeze_audio_encoder=True, lora=LoraSettings(r=4)),
                         **trainable_parts())
    backbone = module.backbone
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    pattern = re.compile(r"backbone\.model\.decoder\.model\.layers\.\d+\.self_attn\.[qkv]_proj\.lora_[AB]\.default\.weight")
    assert all(pattern.fullmatch(n) or n.startswith("head.") or n == "loss.temperature.log_scale" for n in names), names
    for proj in "qkv":
        assert any(f".{proj}_proj.lora_A" in n for n in names)
    assert not any("o_proj" in n or "mlp" in n for n in names)
    module.train()
    assert not backbone.model.audio_encoder.training and not backbone.model.audio_projector.training
    assert backbone.language_model.training


def stage_cli(args: list[str]) -> EmbeddingCLI:
    return EmbeddingCLI(EmbeddingModule, RetrievalDataModule, subclass_mode_data=True, run=False, args=args)


def test_stage1_to_stage2_hand_over(tmp_path):
    stage1 = stage_cli(["--config", str(CONFIGS / "alm2vec.yaml"), "--config", str(CONFIGS / "tiny" / "alm2vec.yaml")])
    # make stage 1's trainable weights distinctive, as training would
    with torch.no_grad():
        for p in stage1.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    trained = trainable_state_dict(stage1.model)
    export = tmp_path / "stage1.safetensors"
    save_file(trained, str(export))
    ckpt = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": stage1.model.state_dict()}, ckpt)

    for source in (export, ckpt):
        stage2 = stage_cli(["--config", str(CONFIGS / "alm2vec_ft.yaml"), "--config",
                            str(CONFIGS / "tiny" / "alm2vec_ft.yaml"), "--model.init_from", str(source)])
        assert stage2.datamodule.hparams.get("train_max_seconds", 30.0) == 30.0
        loaded = trainable_state_dict(stage2.model)
        assert loaded.keys() == trained.keys()
        for name in trained:
            assert torch.equal(loaded[name], trained[name]), name
        frozen1 = {n: p for n, p in stage1.model.named_parameters() if not p.requires_grad}
        for name, p in stage2.model.named_parameters():
            if not p.requires_grad:
                assert torch.equal(p, frozen1[name]), name


def test_init_from_rejects_mismatched_weights(tmp_path, tiny_module):
    path = tmp_path / "bad.safetensors"
    save_file({"head.proj.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ValueError, match="missing .*unexpected|wrong shape"):
        tiny_module(head=LinearHead(3), init_from=str(path))
