"""Codes extracted once into Parquet shards: the same codes the tokenizer gives, the same stage-2 sequences as
encoding on the fly, streamed per process, and refused with another tokenizer."""

import json

import pytest
import torch
from PIL import Image

from unimodal.data.codes import extract_codes, load_codes, read_info
from unimodal.data.images import image_to_tensor
from unimodal.data.pairs import DataSource, load_pairs
from unimodal.tokenizers.image import ImageTokenizer
from unimodal.training.datamodules import SequenceDataModule


@pytest.fixture
def folder(tmp_path):
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 7), ("test", 3)):
        (tmp_path / "pics" / split).mkdir(parents=True)
        for i in range(n):
            pixels = torch.randint(0, 256, (24, 40, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "pics" / split / f"{i}.png")
            (tmp_path / "pics" / split / f"{i}.txt").write_text(f"a small red circle at the top left {i}")
    return tmp_path / "pics"


def test_extracted_codes_are_the_tokenizers_codes_with_flips_and_shards(tiny_bundle, folder, tmp_path):
    tok_dir = tiny_bundle / "image_tokenizer"
    tok = ImageTokenizer.from_pretrained(tok_dir).eval()
    source = DataSource(name=str(folder))
    info = extract_codes(tok, tok_dir, source, tmp_path / "codes", flip=True, rows_per_shard=4, batch_size=3)
    assert info["rows"] == {"train": 14, "test": 6} and info["flip"] and info["rows_per_second"] > 0
    assert read_info(tmp_path / "codes") == json.loads((tmp_path / "codes" / "info.json").read_text())
    assert len(list((tmp_path / "codes" / "train").glob("shard-*.parquet"))) == 4  # 14 rows, 4 per shard
    rows = load_codes(tmp_path / "codes", "train")
    pairs = load_pairs(source, "train")
    pixels = torch.stack([image_to_tensor(im, 32) for im in pairs["image"]])
    expected = {(t, False): c for t, c in zip(pairs["text"], tok.encode(pixels).flatten(1).tolist())}
    expected |= {(t, True): c for t, c in zip(pairs["text"], tok.encode(pixels.flip(-1)).flatten(1).tolist())}
    assert {(r["text"], r["flipped"]): r["codes"] for r in rows} == expected


def test_corner_crops_are_rows_of_their_own(tiny_bundle, folder, tmp_path):
    """crops=5: the whole image and the four corners of it enlarged 1.25x (32 -> 40 pixels), each encoded."""
    tok_dir = tiny_bundle / "image_tokenizer"
    tok = ImageTokenizer.from_pretrained(tok_dir).eval()
    source = DataSource(name=str(folder))
    info = extract_codes(tok, tok_dir, source, tmp_path / "codes", splits=("train",), crops=5, crop_scale=1.25)
    assert info["rows"] == {"train": 35} and info["crops"] == 5 and info["crop_scale"] == 1.25
    pairs = load_pairs(source, "train")
    big = torch.stack([image_to_tensor(im, 40) for im in pairs["image"]])
    corners = {1: big[..., :32, :32], 2: big[..., :32, 8:], 3: big[..., 8:, :32], 4: big[..., 8:, 8:]}
    expected = {(t, 0): c for t, c in zip(pairs["text"], tok.encode(torch.stack(
        [image_to_tensor(im, 32) for im in pairs["image"]])).flatten(1).tolist())}  # fmt: skip
    for crop, pixels in corners.items():
        expected |= {(t, crop): c for t, c in zip(pairs["text"], tok.encode(pixels).flatten(1).tolist())}
    rows = load_codes(tmp_path / "codes", "train")
    assert {(r["text"], r["crop"]): r["codes"] for r in rows} == expected
    assert len({tuple(r["codes"]) for r in rows}) > 7  # the crops are other code sequences, not copies
    with pytest.raises(ValueError, match="crops=3"):
        extract_codes(tok, tok_dir, source, tmp_path / "bad", crops=3)


def _module(tiny_bundle, folder, **kw):
    return SequenceDataModule(str(tiny_bundle / "image_tokenizer"), str(tiny_bundle / "text_tokenizer"),
                              source=DataSource(name=str(folder)), batch_size=2, **kw)  # fmt: skip


def test_stage2_reads_the_same_sequences_from_codes_as_from_images(tiny_bundle, folder, tmp_path):
    tok_dir = tiny_bundle / "image_tokenizer"
    extract_codes(ImageTokenizer.from_pretrained(tok_dir).eval(), tok_dir, DataSource(name=str(folder)),
                  tmp_path / "codes", rows_per_shard=3)  # fmt: skip
    from_images, from_codes = _module(tiny_bundle, folder), _module(tiny_bundle, folder, codes=str(tmp_path / "codes"))
    from_images.setup("fit")
    from_codes.setup("fit")
    for a, b in ((from_images.train_set, from_codes.train_set), (from_images.val_set, from_codes.val_set)):
        assert sorted(map(tuple, a["input_ids"])) == sorted(map(tuple, b["input_ids"]))
    streamed = _module(tiny_bundle, folder, codes=str(tmp_path / "codes"), streaming=True)
    streamed.setup("fit")
    rows = [tuple(ids[m.bool()].tolist()) for batch in streamed.train_dataloader()
            for ids, m in zip(batch["input_ids"], batch["attention_mask"])]  # fmt: skip
    assert len(rows) == 6 and set(rows) <= set(map(tuple, from_images.train_set["input_ids"]))  # 7 rows, batches of 2


def test_codes_of_another_tokenizer_are_refused(tiny_bundle, folder, tmp_path):
    tok_dir = tiny_bundle / "image_tokenizer"
    tok = ImageTokenizer.from_pretrained(tok_dir).eval()
    extract_codes(tok, tok_dir, DataSource(name=str(folder)), tmp_path / "codes", splits=("train",))
    other = tmp_path / "other_tokenizer"
    with torch.no_grad():
        next(tok.parameters()).add_(1.0)
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="another image tokenizer"):
        SequenceDataModule(str(other), str(tiny_bundle / "text_tokenizer"), source=DataSource(name=str(folder)),
                           codes=str(tmp_path / "codes"))  # fmt: skip


def test_marked_crops_train_on_their_own_caption_and_whole_images_on_the_plain_one(tiny_bundle, folder, tmp_path):
    tok_dir = tiny_bundle / "image_tokenizer"
    tok = ImageTokenizer.from_pretrained(tok_dir).eval()
    extract_codes(tok, tok_dir, DataSource(name=str(folder)), tmp_path / "codes", splits=("train",), crops=5)
    module = _module(tiny_bundle, folder, codes=str(tmp_path / "codes"), mark_crops=True)
    module.setup("fit")
    vocab, text = module.vocab, module.text_tokenizer
    expected = [
        vocab.text_to_image_sequence(
            text.encode(f"crop {r['crop']}, {r['text']}" if r["crop"] else r["text"]),
            torch.tensor(r["codes"]).view(vocab.codes_shape),
        )  # fmt: skip
        for r in load_codes(tmp_path / "codes", "train")
    ]
    assert sorted(map(tuple, module.train_set["input_ids"])) == sorted(map(tuple, expected))
    streamed = _module(tiny_bundle, folder, codes=str(tmp_path / "codes"), mark_crops=True, streaming=True)
    streamed.setup("fit")
    rows = [tuple(ids[m.bool()].tolist()) for batch in streamed.train_dataloader()
            for ids, m in zip(batch["input_ids"], batch["attention_mask"])]  # fmt: skip
    assert set(rows) <= set(map(tuple, expected))
    plain = _module(tiny_bundle, folder, codes=str(tmp_path / "codes"))  # unmarked: another cache, plain captions
    plain.setup("fit")
    assert sorted(map(tuple, plain.train_set["input_ids"])) != sorted(map(tuple, expected))
    extract_codes(tok, tok_dir, DataSource(name=str(folder)), tmp_path / "whole", splits=("train",))
    with pytest.raises(ValueError, match="--crops 5"):
        _module(tiny_bundle, folder, codes=str(tmp_path / "whole"), mark_crops=True)
