"""GradCache gives the gradients of the plain full-batch step."""

import pytest
import torch

from builders import tiny_module, tone_pairs, trainable_parts
from lightning_modules import EmbeddingModule
from lightning_modules.adapters import LoraSettings
from lightning_modules.grad_cache import RngState, split_inputs


def examples(n: int = 8) -> list[dict]:
    return tone_pairs(n, seconds_step=0.15, pitch_step=150)


def make_module(dropout: float, chunk: int) -> EmbeddingModule:
    # LoRA B starts at zero; give the adapters non-trivial values so their gradients are exercised.
    module = tiny_module(manual_seed=0, backbone=dict(lora=LoraSettings(r=4, dropout=dropout)), **trainable_parts(),
                         grad_cache_chunk_size=chunk, lora_b_std=0.1)
    return module.train()


def grads(module: EmbeddingModule) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    assert all(g is not None for g in out.values())
    module.zero_grad()
    return out


def cached_grads(module, batch):
    sides = [(batch["query"], batch["query_modality"]), (batch["document"], batch["document_modality"])]
    module.grad_cache.backward(module.embed, sides, lambda emb: module.loss(*emb, batch["info"]))
    return grads(module)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        # float32 sums in a different order: compare relative to each gradient's scale
        scale = float(b[name].abs().max())
        torch.testing.assert_close(a[name], b[name], atol=1e-5 * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize("chunk", [1, 3])
def test_grad_cache_equals_plain_full_batch_step(chunk):
    module = make_module(dropout=0.0, chunk=chunk)
    batch = module.collate(examples())
    query, document = module.embed_batch(batch)
    module.loss(query, document, batch["info"]).loss.backward()
    plain = grads(module)
    assert any("lora_A" in n for n in plain) and any("log_scale" in n for n in plain)
    assert_same(cached_grads(module, batch), plain)


def test_grad_cache_replays_dropout_masks():
    """With dropout the reference is the same chunked forward, built with a graph: only replaying each
    chunk's RNG state makes the second pass see the masks the cached embeddings were made with."""
    module = make_module(dropout=0.3, chunk=3)
    batch = module.collate(examples())
    start = RngState.capture()
    sides = [("query", batch["query_modality"]), ("document", batch["document_modality"])]
    embedded = [torch.cat([module.embed(c, m) for c in split_inputs(batch[s], 3)]) for s, m in sides]
    module.loss(*embedded, batch["info"]).loss.backward()
    reference = grads(module)
    start.restore()
    assert_same(cached_grads(module, batch), reference)


def test_split_inputs_equals_collating_the_chunk_alone():
    module = make_module(dropout=0.0, chunk=3)
    items = examples()
    whole = module.collate(items)
    for start, chunk in zip(range(0, 8, 3), split_inputs(whole["document"], 3)):
        alone = module.collate(items[start : start + 3])["document"]
        assert torch.equal(chunk["input_ids"], alone["input_ids"])
        assert torch.equal(chunk["attention_mask"], alone["attention_mask"])


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="grad_cache_chunk_size"):
        tiny_module(grad_cache_chunk_size=0)
