import json

import datasets
import pytest
import torch
from PIL import Image

from unimodal.data.images import image_to_tensor
from unimodal.data.pairs import DataSource, load_pairs
from unimodal.data.shapes import COLORS, HELDOUT_PAIRS, SHAPES, ShapesConfig, scene_from_row, shapes_dataset

SMALL = ShapesConfig(train_size=400, test_size=50, heldout_size=50)


def test_shapes_is_deterministic_and_holds_out_pairs(hf_cache):
    dd = shapes_dataset(SMALL, cache_dir=str(hf_cache))
    again = shapes_dataset(SMALL, cache_dir=str(hf_cache / "other"))
    assert dd["train"]["text"] == again["train"]["text"]
    assert set(dd) == {"train", "test", "heldout"}
    held = set(HELDOUT_PAIRS)
    train_pairs = {(o["color"], o["shape"]) for row in dd["train"] for o in scene_from_row(row)}
    assert not train_pairs & held, "a held-out colour-shape pair leaked into train"
    assert {c for c, _ in train_pairs} == set(COLORS) and {s for _, s in train_pairs} == set(SHAPES)
    for row in dd["heldout"]:
        assert any((o["color"], o["shape"]) in held for o in scene_from_row(row))
    row = dd["train"][0]
    for o in scene_from_row(row):  # the caption names every object's attributes
        assert o["color"] in row["text"] and o["shape"] in row["text"] and o["position"] in row["text"]


def test_image_to_tensor_converts_any_mode_and_size():
    for mode in ("L", "RGBA", "P", "I;16", "LA"):
        img = Image.new(mode, (50, 20))
        x = image_to_tensor(img, 32)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
    tiny = image_to_tensor(Image.new("RGB", (8, 8), (255, 0, 0)), 32)  # upscaled, not rejected
    assert tiny.shape == (3, 32, 32) and torch.allclose(tiny[0], torch.ones(32, 32))


def test_imagefolder_with_metadata_loads_through_the_same_path(tmp_path):
    folder = tmp_path / "pets"
    folder.mkdir()
    rows = []
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40, 30), COLORS[color]).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "caption": f"a {color} thing"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_pairs(DataSource(name=str(folder), text_column="caption"), "train")
    assert len(ds) == 3 and {"image", "text"} <= set(ds.column_names)
    assert sorted(ds["text"]) == ["a blue thing", "a green thing", "a red thing"]
    assert image_to_tensor(ds[0]["image"], 32).shape == (3, 32, 32)


def test_saved_dataset_with_other_column_names(tmp_path):
    img = Image.new("RGB", (16, 16))
    ds = datasets.Dataset.from_dict({"picture": [img, img], "caption": ["one", "two"]})
    ds = ds.cast_column("picture", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    out = load_pairs(DataSource(name=str(tmp_path / "saved"), image_column="picture", text_column="caption"), "train")
    assert out["text"] == ["one", "two"]
    with pytest.raises(ValueError, match="text_column"):
        load_pairs(DataSource(name=str(tmp_path / "saved"), image_column="picture", text_column="words"), "train")
    with pytest.raises(ValueError, match="no split 'test'"):
        load_pairs(DataSource(name=str(tmp_path / "saved"), image_column="picture", text_column="caption"), "test")


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


def test_bad_rows_are_skipped_with_a_count(tmp_path, caplog):
    from unimodal.training.datamodules import ImageDataModule

    _write_folder(tmp_path / "mixed", good=7, corrupt=2)
    dm = ImageDataModule(source=DataSource(name=str(tmp_path / "mixed")), batch_size=2, val_split="train")
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert len(dm.train_set) == 7
    assert "skipped 2 of 9 rows with unreadable images" in caplog.text
    batch = next(iter(dm.val_dataloader()))
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.float32


def test_open_image_names_the_bad_file(tmp_path):
    from unimodal.data.images import BadImageError, open_image

    bad = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(bad)
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(BadImageError, match="truncated.png"):
        open_image(str(bad))
