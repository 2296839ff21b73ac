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


def _rgba_icon(size=(40, 30)) -> Image.Image:
    """A red disc on a transparent background, the way emoji and icons are shipped."""
    im = Image.new("RGBA", size, (0, 0, 0, 0))
    w, h = size
    for x in range(w // 4, 3 * w // 4):
        for y in range(h // 4, 3 * h // 4):
            im.putpixel((x, y), (255, 0, 0, 255))
    return im


def test_transparency_is_composited_on_white_by_default_and_on_a_chosen_colour():
    icon = _rgba_icon()
    white = image_to_tensor(icon, 32)
    assert white[:, 0, 0].tolist() == [1.0, 1.0, 1.0]  # corner: transparent -> white, not black
    assert white[:, 16, 16].tolist() == [1.0, -1.0, -1.0]  # centre: the opaque red
    gray = image_to_tensor(icon, 32, background="#808080")
    assert abs(float(gray[0, 0, 0]) - (128 / 127.5 - 1)) < 1e-6
    with pytest.raises(ValueError, match="not a colour"):
        DataSource(name="shapes", background="whte")


def test_folder_of_images_with_txt_captions_beside_them(tmp_path, caplog):
    for split, n in (("train", 3), ("test", 2)):
        folder = tmp_path / "pics" / split
        folder.mkdir(parents=True)
        for i in range(n):
            _rgba_icon((20 + i, 30)).save(folder / f"{split}{i}.png")
            (folder / f"{split}{i}.txt").write_text(f"red disc number {i}\n")
    (tmp_path / "pics" / "train" / "orphan.png").write_bytes(b"")  # no caption file: counted, left out
    _rgba_icon().save(tmp_path / "pics" / "train" / "blank.png")
    (tmp_path / "pics" / "train" / "blank.txt").write_text("  \n")  # empty caption: counted, kept
    with caplog.at_level("WARNING"):
        train = load_pairs(DataSource(name=str(tmp_path / "pics")), "train")
    assert sorted(train["text"]) == ["", "red disc number 0", "red disc number 1", "red disc number 2"]
    assert "1 of 5 images have no .txt caption" in caplog.text and "1 of 4 caption files are empty" in caplog.text
    test = load_pairs(DataSource(name=str(tmp_path / "pics")), "test")
    assert len(test) == 2 and image_to_tensor(test[0]["image"], 16)[:, 0, 0].tolist() == [1.0, 1.0, 1.0]


def test_flat_folder_of_txt_captions_is_the_train_split(tmp_path):
    for i in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.jpg")
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    assert len(load_pairs(DataSource(name=str(tmp_path)), "train")) == 2
    with pytest.raises(ValueError, match="test/ subfolder"):
        load_pairs(DataSource(name=str(tmp_path)), "test")


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_table_of_paths_and_captions_relative_to_the_file(tmp_path, suffix):
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.new("RGB", (12, 9), (i * 80, 0, 0)).save(tmp_path / "img" / f"{i}.png")
    table = datasets.Dataset.from_dict({"path": [f"img/{i}.png" for i in range(3)], "prompt": ["a", "b", "c"]})
    file = tmp_path / f"pairs{suffix}"
    {".csv": table.to_csv, ".parquet": table.to_parquet, ".jsonl": table.to_json}[suffix](str(file))
    ds = load_pairs(DataSource(name=str(file)), "train")  # columns found by name: path -> image, prompt -> text
    assert ds["text"] == ["a", "b", "c"]
    assert image_to_tensor(ds[2]["image"], 8)[0, 0, 0] == pytest.approx(160 / 127.5 - 1)


def test_any_caption_column_name_in_metadata_is_found(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "description": "one"}) + "\n")
    assert load_pairs(DataSource(name=str(tmp_path)), "train")["text"] == ["one"]


def test_a_missing_source_says_what_to_give(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_pairs(DataSource(name=str(tmp_path / "nowhere.csv")), "train")


def test_a_table_without_an_image_path_column_says_which_columns_it_has(tmp_path):
    datasets.Dataset.from_dict({"picture_file": ["a.png"], "caption": ["one"]}).to_csv(str(tmp_path / "pairs.csv"))
    with pytest.raises(ValueError, match="no image-path column.*picture_file"):
        load_pairs(DataSource(name=str(tmp_path / "pairs.csv")), "train")
