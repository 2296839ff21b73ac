"""(image, caption) pairs from an image folder or a saved dataset, through the one loading path."""

import json

import datasets
import pytest
from PIL import Image

from unimodal.data.images import image_to_tensor
from unimodal.data.pairs import DataSource, load_pairs
from unimodal.data.shapes import COLORS


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
