"""The Lightning data modules: unreadable rows skipped with a count, odd captions handled, and the
caption-dropout / image-to-text mix keyed by seed and batch index."""

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from unimodal.data.pairs import DataSource
from unimodal.lm.grammar import SegmentGrammar
from unimodal.training.datamodules import ImageDataModule, SequenceDataModule


def _write_folder(folder, good: int, corrupt: int):
    """An imagefolder with `good` valid images of assorted modes and `corrupt` broken files."""
    folder.mkdir()
    rows = []
    modes = ["RGB", "L", "RGBA", "P", "I;16"]
    for i in range(good):
        Image.new(modes[i % len(modes)], (20 + i, 40)).save(folder / f"ok{i}.png")
        rows.append({"file_name": f"ok{i}.png", "text": f"image {i} 🐱 日本" if i else ""})
    for i in range(corrupt):
        (folder / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 3)
        rows.append({"file_name": f"bad{i}.png", "text": "broken"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def test_stage1_data_skips_unreadable_images_with_a_count(tmp_path, caplog):
    _write_folder(tmp_path / "mixed", good=7, corrupt=2)
    dm = ImageDataModule(source=DataSource(name=str(tmp_path / "mixed")), batch_size=2, val_split="train")
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert len(dm.train_set) == 7
    assert "skipped 2 of 9 rows with unreadable images" in caplog.text
    batch = next(iter(dm.val_dataloader()))
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.float32


def test_stage2_data_skips_bad_rows_and_handles_odd_captions(tiny_bundle, tmp_path, caplog):
    folder = tmp_path / "odd"
    folder.mkdir()
    captions = ["", "a red circle " * 30, "猫 🐱 émoji", "plain caption"]
    rows = []
    for i, text in enumerate(captions):
        Image.new("LA", (48, 17)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "caption": text})
    (folder / "broken.png").write_bytes(b"not an image at all")
    rows.append({"file_name": "broken.png", "caption": "x"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = SequenceDataModule(
        image_tokenizer=str(tiny_bundle / "image_tokenizer"), text_tokenizer=str(tmp_path / "bpe"),
        source=DataSource(name=str(folder), text_column="caption"), batch_size=2, val_split="train",
        max_text_tokens=16,
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    text = caplog.text
    assert "skipped 1 of 5 rows" in text and "exceed max_text_tokens=16" in text and "1 of 5 captions are empty" in text
    g = SegmentGrammar(dm.vocab)
    assert len(dm.train_set) == 4 and all(g.is_valid(r["input_ids"]) for r in dm.train_set)


def test_caption_dropout_and_i2t_mix_depend_only_on_seed_and_batch_index(tiny_bundle):
    def dm(**kw):
        return SequenceDataModule(str(tiny_bundle / "image_tokenizer"), str(tiny_bundle / "text_tokenizer"), **kw)

    plain, mixed = dm(), dm(caption_dropout=0.3, i2t_fraction=0.3, mix_seed=1)
    assert not plain.vocab.image_to_text and mixed.vocab.image_to_text
    v, g = mixed.vocab, SegmentGrammar(mixed.vocab)
    codes = torch.randint(0, v.image_size, (64, *v.image_grid))
    batch = mixed._collate([{"input_ids": v.text_to_image_sequence([1, 2, 3], c)} for c in codes])
    assert plain.mix(batch, 0) is batch  # defaults: the batch is untouched
    a, b, c = mixed.mix(batch, 7), mixed.mix(batch, 7), mixed.mix(batch, 8)
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], c["input_ids"])
    kinds = []
    for ids, mask in zip(a["input_ids"], a["attention_mask"]):
        seq = ids[mask.bool()].tolist()
        assert g.is_valid(seq)
        kinds.append("i2t" if seq[1] == v.boi and seq[-2] != v.eoi else "null" if seq[1] == v.boi else "t2i")
    assert {"i2t", "null", "t2i"} == set(kinds)
    # in a fit, the hook keys the mix by the loop's batch counter, and leaves validation batches alone
    progress = SimpleNamespace(total=SimpleNamespace(ready=7))
    mixed.trainer = SimpleNamespace(training=True, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
        batch_progress=progress)))  # fmt: skip
    assert torch.equal(mixed.on_before_batch_transfer(batch, 0)["input_ids"], a["input_ids"])
    mixed.trainer.training = False
    assert mixed.on_before_batch_transfer(batch, 0) is batch
    with pytest.raises(ValueError, match="caption_dropout must be in"):
        dm(caption_dropout=1.0)


def test_codes_stage_refuses_a_continuous_tokenizer_and_names_the_program_for_it(tmp_path):
    from unimodal.tokenizers.image import ImageTokenizer, ImageTokenizerConfig

    tokenizer = ImageTokenizer(ImageTokenizerConfig(resolution=16, channels=8, quantizer="kl", latent_dim=4))
    tokenizer.save_pretrained(tmp_path / "kl")
    with pytest.raises(ValueError, match="continuous image tokenizer .*`unimodal continuous fit`"):
        SequenceDataModule(image_tokenizer=str(tmp_path / "kl"), text_tokenizer=str(tmp_path / "bpe"))


def test_latent_stage_refuses_a_codes_tokenizer(tmp_path):
    from unimodal.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
    from unimodal.training.continuous import LatentSequenceDataModule

    ImageTokenizer(ImageTokenizerConfig(resolution=16, channels=8)).save_pretrained(tmp_path / "vq")
    with pytest.raises(ValueError, match="has quantizer 'vq'; continuous stage 2 needs a continuous tokenizer"):
        LatentSequenceDataModule(image_tokenizer=str(tmp_path / "vq"), text_tokenizer=str(tmp_path / "bpe"))
