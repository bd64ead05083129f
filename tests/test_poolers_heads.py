import pytest
import torch

from lightning_modules.backbones.base import BackboneOutput
from lightning_modules.heads import IdentityHead, LinearHead, MLPHead, ModalityHeads
from lightning_modules.poolers import EmbTokenPooler, LastTokenPooler, MeanPooler

EMB = 9
PAD = 0


def make_output(rows: list[list[int]], padding_side: str) -> BackboneOutput:
    """Hidden state at (b, t) is the vector [b, token id, t of the unpadded row] so picks are readable."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    hidden = torch.zeros(len(rows), width, 3)
    for b, row in enumerate(rows):
        offset = width - len(row) if padding_side == "left" else 0
        for t, tok in enumerate(row):
            ids[b, offset + t] = tok
            mask[b, offset + t] = 1
            hidden[b, offset + t] = torch.tensor([b, tok, t], dtype=torch.float)
    return BackboneOutput(hidden, mask, ids, emb_token_id=EMB)


ROWS = [[5, 6, 7, EMB, 3, 4], [1, 2, EMB, 8], [4, 4, 4, 4, 2, EMB, 1, 2]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_emb_token_pooler_takes_state_before_marker(side):
    pooled = EmbTokenPooler()(make_output(ROWS, side))
    # (row, token before <emb>, its position in the unpadded row)
    assert pooled.tolist() == [[0, 7, 2], [1, 2, 1], [2, 2, 4]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_pooler(side):
    pooled = LastTokenPooler()(make_output(ROWS, side))
    assert pooled.tolist() == [[0, 4, 5], [1, 8, 3], [2, 2, 7]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_mean_pooler_ignores_padding(side):
    out = make_output(ROWS, side)
    pooled = MeanPooler()(out)
    for b, row in enumerate(ROWS):
        expected = torch.tensor([[b, tok, t] for t, tok in enumerate(row)], dtype=torch.float).mean(0)
        torch.testing.assert_close(pooled[b], expected)


def test_emb_pooler_errors_without_marker():
    out = make_output([[1, 2, 3], [1, EMB, 2]], "left")
    with pytest.raises(ValueError, match=r"rows \[0\] contain no <emb>"):
        EmbTokenPooler()(out)
    out.emb_token_id = None
    with pytest.raises(ValueError, match="needs a backbone"):
        EmbTokenPooler()(out)


def test_emb_pooler_ignores_marker_in_padding():
    out = make_output([[1, 2, EMB, 3], [4, EMB]], "right")
    out.input_ids[1, 3] = EMB  # a marker id under padding must not be picked
    assert EmbTokenPooler()(out)[:, 1].tolist() == [2, 4]


def test_heads_shapes_and_routing():
    x = torch.randn(3, 8)
    assert torch.equal(IdentityHead()(x, "audio"), x)
    for head in (LinearHead(4), MLPHead(4, hidden_features=16)):
        head.build(8)
        assert head(x, "text").shape == (3, 4)
    heads = ModalityHeads(5)
    heads.build(8)
    torch.testing.assert_close(heads(x, "audio"), heads.audio(x))
    torch.testing.assert_close(heads(x, "audio_text"), heads.audio(x))
    torch.testing.assert_close(heads(x, "text"), heads.text(x))
    assert not torch.allclose(heads(x, "audio"), heads(x, "text"))
