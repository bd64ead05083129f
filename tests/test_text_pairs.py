"""Text-only pairs (AuroLA's text pre-training stage): query text vs document text, with the rows'
hard negatives as extra documents of the batch.

The training loss is checked against a float64 recomputation from separately embedded queries,
documents and negatives with the InfoNCE formula over all B + M documents written out here."""

import math

import pytest
import torch

from datamodules.audio import AudioPolicy
from datamodules.datasets import EvalDataset, PairDataset
from datamodules.inputs import EmbedInput
from datamodules.manifest import ClipRecord
from builders import tiny_module
from lightning_modules import IdentityHead
from lightning_modules.adapters import LoraSettings
from losses import BatchInfo, InfoNCE

ROWS = [
    ("a man plays a guitar", "someone is making music", ["nobody is playing"]),
    ("two dogs run on grass", "animals are outside", ["the dogs are asleep"]),
    ("a child reads a book", "a kid is reading", []),
    ("rain falls on the roof", "it is raining", ["the sky is clear", "it is sunny"]),
]


def records(rows=ROWS):
    out = []
    for i, (query, document, negatives) in enumerate(rows):
        extra = {"query_text": query}
        if negatives:
            extra["hard_negatives"] = negatives
        out.append(ClipRecord(id=f"nli:{i + 2}", audio_path="", captions=[document], extra=extra, source=f"nli.csv:{i + 2}"))
    return out


def dataset(hard_negatives=True):
    return PairDataset(records(), 16000, AudioPolicy(10.0), hard_negatives=hard_negatives)


def test_items_hold_the_query_text_the_document_and_the_negatives():
    item = dataset()[3]
    assert item["query"].text == "rain falls on the roof" and item["query"].audio is None
    assert [doc.text for doc in item["documents"]] == ["it is raining"]
    assert [neg.text for neg in item["negatives"]] == ["the sky is clear", "it is sunny"]
    assert item["caption_kind"] == "text_pair"
    assert dataset(hard_negatives=False)[3]["negatives"] == []


def test_text_pairs_are_not_evaluation_rows():
    with pytest.raises(ValueError, match=r"nli.csv:2: text pairs .* training rows"):
        EvalDataset(records(), 16000, AudioPolicy(10.0))


@pytest.fixture(scope="module")
def module():
    module = tiny_module(manual_seed=0, backbone=dict(lora=LoraSettings(r=4)), head=IdentityHead(),
                         loss=InfoNCE(temperature=0.05, directions="q2d"))
    return module.train()


def test_collated_batch_puts_the_negatives_after_the_pairs(module):
    data = dataset()
    batch = module.collate([data[i] for i in range(len(data))])
    assert batch["query_modality"] == "text" and batch["document_modality"] == "text"
    assert batch["texts"] == [r[1] for r in ROWS] + ["nobody is playing", "the dogs are asleep",
                                                     "the sky is clear", "it is sunny"]
    assert batch["info"].texts == [r[1] for r in ROWS]
    assert batch["info"].extra_texts == ["nobody is playing", "the dogs are asleep", "the sky is clear", "it is sunny"]
    assert batch["document_index"].tolist() == [0, 1, 2, 3, -1, -1, -1, -1]
    assert batch["document"]["input_ids"].shape[0] == 8 and batch["query"]["input_ids"].shape[0] == 4


def test_training_loss_uses_every_negative(module):
    data = dataset()
    batch = module.collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        query, document = module.embed_batch(batch)
        loss = module.training_loss(query, document, batch).loss.item()
        # Embedded one text at a time, independently of the batch.
        texts = [r[1] for r in ROWS] + batch["info"].extra_texts
        docs = torch.cat([module._embed_texts([EmbedInput(text=t)]) for t in texts]).double()
    q = query.double()
    scale = module.loss.temperature.scale(torch.float64).item()
    expected = 0.0
    for i in range(len(ROWS)):
        logits = [scale * float(q[i] @ docs[j]) for j in range(len(texts))]
        expected += math.log(sum(math.exp(x) for x in logits)) - logits[i]
    expected /= len(ROWS)
    assert loss == pytest.approx(expected, abs=1e-4)
    without = module.loss(query, document[: len(ROWS)], BatchInfo(texts=batch["info"].texts)).loss.item()
    assert without < loss  # the negatives enlarge every denominator


def lora_module(r, alpha, init_from=None, merge=False):
    # manual_seed: the same tiny base weights in both stages, as a real checkpoint gives
    return tiny_module(manual_seed=0, backbone=dict(lora=LoraSettings(r=r, alpha=alpha)), head=IdentityHead(),
                       loss=InfoNCE(), init_from=init_from, init_merge_lora=merge).eval()


def test_hand_over_merges_the_text_stage_adapters_into_the_next_stage(tmp_path):
    """The next stage (fresh rank-8 adapters, B = 0) must embed exactly as the text stage (rank 4,
    its adapters applied unmerged by peft) did."""
    text_stage = lora_module(4, 8)
    with torch.no_grad():
        for name, param in text_stage.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.2)
    checkpoint = {"state_dict": text_stage.state_dict()}
    text_stage.on_save_checkpoint(checkpoint)
    path = tmp_path / "text_stage.ckpt"
    torch.save(checkpoint, path)

    batch = text_stage.collate([dataset()[i] for i in range(len(ROWS))])
    with torch.no_grad():
        expected = torch.cat(text_stage.embed_batch(batch))
        fresh = torch.cat(lora_module(8, 16).embed_batch(batch))
        merged = lora_module(8, 16, init_from=str(path), merge=True)
        got = torch.cat(merged.embed_batch(batch))
    assert (fresh - expected).abs().max() > 1e-2  # the text stage's adapters do change the embeddings
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert all(float(p.detach().abs().max()) == 0 for n, p in merged.named_parameters() if "lora_B" in n)

    with pytest.raises(ValueError, match="does not match the model's trainable weights"):
        lora_module(8, 16, init_from=str(path))  # without merging, the ranks must agree
    del checkpoint["lora_scaling"]
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="records its LoRA scaling"):
        lora_module(8, 16, init_from=str(path), merge=True)


# --- reading text pairs, and the two-stage recipe through the CLI ---------------------------------

from pathlib import Path  # noqa: E402

from datamodules.manifest import ManifestError, read_manifest, screen_audio  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def test_nli_csv_rows_become_text_pairs(tmp_path):
    path = tmp_path / "nli.csv"
    path.write_text('sent0,sent1,hard_neg\nA dog barks.,"An animal, loud.",A cat sleeps.\n'
                    '"Two\nlines",Rain.,\n', encoding="utf-8")
    records = read_manifest(str(path))
    assert [(r.id, r.extra["query_text"], r.captions, r.extra.get("hard_negatives")) for r in records] == [
        (f"{path}:2", "A dog barks.", ["An animal, loud."], ["A cat sleeps."]),
        (f"{path}:3", "Two\nlines", ["Rain."], None),  # a quoted cell over two lines; no hard negative
    ]
    kept, durations = screen_audio(records)
    assert kept == records and durations == [0.0, 0.0]


def test_bad_text_pair_rows_name_file_and_line(tmp_path):
    path = tmp_path / "nli.csv"
    path.write_text("sent0,sent1\nfine,also fine\n,empty query\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=rf"{path}:3: 'query_text' entries must be non-empty"):
        read_manifest(str(path))
    problems = []
    assert [r.extra["query_text"] for r in read_manifest(str(path), problems=problems)] == ["fine"]
    assert [p.reason for p in problems] == ["empty_text"]
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"unknown CSV layout \(columns \['a', 'b'\]\)"):
        read_manifest(str(other))
    rows = tmp_path / "pairs.jsonl"
    rows.write_text('{"query_text": "q", "document_text": "d", "hard_negatives": ["n1", "n2"], "id": "p1"}\n'
                    '{"query_text": "q only"}\n', encoding="utf-8")
    with pytest.raises(ManifestError, match=rf"{rows}:2: a text pair needs both"):
        read_manifest(str(rows))
    first = read_manifest(str(rows), problems=[])[0]
    assert (first.id, first.extra["hard_negatives"], first.audio_path) == ("p1", ["n1", "n2"], "")


def test_text_stage_hands_over_to_the_audio_stage(tmp_path, monkeypatch):
    """configs/aurola_text.yaml (tiny) trains on the NLI fixture; configs/aurola.yaml (tiny) starts from
    it with the text adapters merged (rank 64 into the base weights, fresh rank-16 adapters)."""
    from main import main

    monkeypatch.chdir(REPO)  # the tiny overlay names the fixture relative to the repository
    common = ["--trainer.enable_progress_bar", "false"]
    main(["fit", "--config", "configs/aurola_text.yaml", "--config", "configs/tiny/aurola_text.yaml", *common,
          "--trainer.default_root_dir", str(tmp_path / "text")])
    ckpt = next((tmp_path / "text").rglob("last.ckpt"))
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    lora_a = [k for k in saved["state_dict"] if ".lora_A." in k]
    assert lora_a and all(saved["state_dict"][k].shape[0] == 64 for k in lora_a)
    assert set(saved["lora_scaling"].values()) == {2.0}  # alpha 128 / r 64
    main(["fit", "--config", "configs/aurola.yaml", "--config", "configs/tiny/aurola.yaml", *common,
          "--data.init_args.root", str(tmp_path / "synthetic"), "--data.init_args.num_train", "8",
          "--data.init_args.num_val", "8", "--data.init_args.num_test", "8", "--trainer.fast_dev_run", "1",
          "--trainer.default_root_dir", str(tmp_path / "audio"), "--test_after_fit", "false",
          "--model.init_from", str(ckpt), "--model.init_merge_lora", "true"])


def test_check_data_reads_the_nli_csv_without_short_clip_warnings(capsys):
    from datamodules.check import main as check_data

    status = check_data(["--config", str(REPO / "configs/aurola_text.yaml"), "--config",
                         str(REPO / "configs/tiny/aurola_text.yaml"),
                         "--data.init_args.train_manifest", str(REPO / "tests/fixtures/nli_tiny.csv")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "16" in out and "short_clip" not in out
