"""Any image-caption source as one `datasets.Dataset` with an `image` column and a `text` column.

`DataSource` names where the pairs come from and which columns hold image and caption. Accepted:

- "shapes": the built-in synthetic set;
- an imagefolder: `metadata.jsonl` / `metadata.csv` beside the images (`file_name` + a caption column);
- a folder of images with same-name `.txt` caption files beside them (`cat.png` + `cat.txt`);
- a `.csv` / `.parquet` / `.jsonl` file of (image path, caption) rows, paths relative to the file;
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
- any other name: `datasets.load_dataset(name)` (a local builder or a dataset in the local cache).

In a folder, `train/`, `test/`, ... subfolders are the splits; without them everything is `train`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch

from .images import BACKGROUND, background_rgb, decode_or_skip, images_to_tensor
from .shapes import ShapesConfig, shapes_dataset

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".jsonl": "json", ".json": "json"}
IMAGE_COLUMNS = ("image", "file_name", "path", "image_path", "filename", "file", "img")
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt", "description", "title", "alt_text", "sentence")


@dataclass
class DataSource:
    """Where image-caption pairs come from.

    - `name="shapes"`: the built-in dataset (`shapes` holds its settings).
    - `name` = a folder: an imagefolder with `metadata.jsonl` (`file_name` + caption column), or a
      folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
    - any other `name`: passed to `datasets.load_dataset(name, ...)` (local builders such as
      "imagefolder" with `data_dir`, or a dataset already in the local cache).
    Columns are renamed from `image_column`/`text_column` to `image`/`text`; left unset, they are
    the first columns named like an image (IMAGE_COLUMNS) and a caption (CAPTION_COLUMNS). `background` is the
    colour transparent pixels are composited onto (a name or #rrggbb).
    """

    name: str = "shapes"
    data_dir: str | None = None
    image_column: str | None = None  # None: the first of IMAGE_COLUMNS the data has
    text_column: str | None = None  # None: the first of CAPTION_COLUMNS the data has
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    cache_dir: str | None = None
    background: str = BACKGROUND

    def __post_init__(self):
        if isinstance(self.shapes, dict):
            self.shapes = ShapesConfig(**self.shapes)
        background_rgb(self.background)  # refuse a bad colour now, not inside a DataLoader worker

    def to_dict(self) -> dict:
        """JSON-friendly record (a bundle keeps the one it was trained on); local paths made absolute."""
        record = asdict(self)
        if self.name != "shapes" and Path(self.name).exists():
            record["name"] = str(Path(self.name).resolve())
        return record

    @classmethod
    def from_dict(cls, record: dict) -> DataSource:
        return cls(**record)

    def same_data(self, other: DataSource) -> bool:
        """Same pairs: same name (paths compared resolved), builder directory and settings."""
        a, b = self.to_dict(), other.to_dict()
        keep = ("name", "data_dir") if self.name != "shapes" else ("name", "shapes")
        return all(a[k] == b[k] for k in keep)


def _rename_columns(ds: datasets.Dataset, source: DataSource, split: str) -> datasets.Dataset:
    def pick(chosen, names):
        return chosen or next((c for c in names if c in ds.column_names), names[0])

    image_column, text_column = pick(source.image_column, IMAGE_COLUMNS), pick(source.text_column, CAPTION_COLUMNS)
    missing = [c for c in (image_column, text_column) if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"split {split!r} of {source.name!r} has no column(s) {missing}; its columns are "
            f"{ds.column_names}. Set data.source.image_column / data.source.text_column to the right names."
        )
    mapping = {image_column: "image", text_column: "text"}
    mapping = {k: v for k, v in mapping.items() if k != v}
    for new in mapping.values():  # a column already named "image"/"text" that is not the chosen one
        if new in ds.column_names and new not in mapping:
            ds = ds.remove_columns(new)
    ds = ds.rename_columns(mapping)
    if not isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image())
    return ds


def _has_metadata(folder: Path) -> bool:
    return (
        any(folder.rglob("metadata.jsonl"))
        or any(folder.rglob("metadata.csv"))
        or any(folder.rglob("metadata.parquet"))
    )


def _split_folders(folder: Path) -> dict[str, Path]:
    """Split name -> folder: the subfolders holding images, or the folder itself as `train`."""
    subs = {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    splits = {name: p for name, p in subs.items() if any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.rglob("*"))}
    return splits or {"train": folder}


def _sidecar_split(folder: Path) -> datasets.Dataset:
    """Images with same-name .txt captions; images without one are counted, reported and left out."""
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    rows, missing = {"image": [], "text": []}, []
    for image in images:
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            missing.append(image.name)
            continue
        rows["image"].append(str(image))
        rows["text"].append(caption.read_text(encoding="utf-8", errors="replace").strip())
    if missing:
        log.warning("%s: %d of %d images have no .txt caption beside them and are left out (e.g. %s)",
                    folder, len(missing), len(images), ", ".join(missing[:3]))  # fmt: skip
    if not rows["image"]:
        raise ValueError(f"{folder}: none of its {len(images)} images has a .txt caption file beside it")
    empty = sum(not t for t in rows["text"])
    if empty:
        log.warning("%s: %d of %d caption files are empty (those images train the unconditional case)",
                    folder, empty, len(rows["text"]))  # fmt: skip
    return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())


def _table(path: Path, source: DataSource) -> datasets.DatasetDict:
    """A .csv/.parquet/.jsonl of (image path, caption): paths made absolute from the file's folder."""
    dd = datasets.load_dataset(TABLE_SUFFIXES[path.suffix.lower()], data_files=str(path), cache_dir=source.cache_dir)
    ds = dd["train"]
    column = source.image_column or next((c for c in IMAGE_COLUMNS if c in ds.column_names), None)
    if column is None:
        raise ValueError(f"{path} has no image-path column; its columns are {ds.column_names}. "
                         f"Name one {list(IMAGE_COLUMNS)} or set data.source.image_column.")  # fmt: skip
    if isinstance(ds.features[column], datasets.Value):  # paths (not already decoded images)
        ds = ds.map(lambda r: {column: str(path.parent / r[column]) if r[column] else ""}, desc="image paths")
    return datasets.DatasetDict({"train": ds})


def _load_all(source: DataSource) -> datasets.DatasetDict | datasets.Dataset:
    if source.name == "shapes":
        return shapes_dataset(source.shapes, cache_dir=source.cache_dir)
    path = Path(source.name)
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        return _table(path, source)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        return datasets.load_from_disk(str(path))
    if path.is_dir() and not _has_metadata(path) and any(path.rglob("*.txt")):
        return datasets.DatasetDict({name: _sidecar_split(p) for name, p in _split_folders(path).items()})
    if path.is_dir():
        return datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=source.cache_dir)
    if path.suffix or "/" in source.name and not path.exists():
        raise ValueError(f"data source {source.name!r} does not exist; give a folder, a .csv/.parquet/.jsonl file, "
                         f"'shapes', or the name of a local datasets dataset")  # fmt: skip
    return datasets.load_dataset(source.name, data_dir=source.data_dir, cache_dir=source.cache_dir)


def load_pairs(source: DataSource, split: str) -> datasets.Dataset:
    """One split of image-caption pairs with columns `image` and `text` (plus whatever else it had)."""
    dd = _load_all(source)
    if isinstance(dd, datasets.Dataset):
        dd = datasets.DatasetDict({"train": dd})
    if split not in dd:
        raise ValueError(
            f"{source.name!r} has no split {split!r}; it has {list(dd)}. Put held-out pairs in a {split}/ "
            f"subfolder, or validate on another split (e.g. data.val_split: {next(iter(dd))})."
        )
    return _rename_columns(dd[split], source, split)


def readable_images(ds: datasets.Dataset, resolution: int, background: str = BACKGROUND):
    """The images of the rows that can be read, as a tensor (N, 3, R, R) in [-1, 1], and those rows' indices."""
    undecoded = ds.cast_column("image", datasets.Image(decode=False))["image"] if len(ds) else []
    images, bad = decode_or_skip(undecoded)
    unreadable = set(bad)
    keep = [i for i in range(len(undecoded)) if i not in unreadable]
    if not images:  # no rows, or none readable
        return torch.empty(0, 3, resolution, resolution), keep
    return images_to_tensor(images, resolution, background), keep
