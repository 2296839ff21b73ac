"""Any image-caption source as one `datasets.Dataset` with an `image` column and a `text` column.

`DataSource` names where the pairs come from (the built-in shapes, a folder, any `datasets`
dataset) and which columns hold image and caption.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import datasets

from .shapes import ShapesConfig, shapes_dataset


@dataclass
class DataSource:
    """Where image-caption pairs come from.

    - `name="shapes"`: the built-in dataset (`shapes` holds its settings).
    - `name` = a folder: an imagefolder with `metadata.jsonl` (`file_name` + caption column), or a
      folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
    - any other `name`: passed to `datasets.load_dataset(name, ...)` (local builders such as
      "imagefolder" with `data_dir`, or a dataset already in the local cache).
    Columns are renamed from `image_column`/`text_column` to `image`/`text`.
    """

    name: str = "shapes"
    data_dir: str | None = None
    image_column: str = "image"
    text_column: str = "text"
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    cache_dir: str | None = None


def _rename_columns(ds: datasets.Dataset, source: DataSource, split: str) -> datasets.Dataset:
    missing = [c for c in (source.image_column, source.text_column) if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"split {split!r} of {source.name!r} has no column(s) {missing}; its columns are "
            f"{ds.column_names}. Set data.source.image_column / data.source.text_column to the right names."
        )
    mapping = {source.image_column: "image", source.text_column: "text"}
    mapping = {k: v for k, v in mapping.items() if k != v}
    for new in mapping.values():  # a column already named "image"/"text" that is not the chosen one
        if new in ds.column_names and new not in mapping:
            ds = ds.remove_columns(new)
    ds = ds.rename_columns(mapping)
    if not isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image())
    return ds


def load_pairs(source: DataSource, split: str) -> datasets.Dataset:
    """One split of image-caption pairs with columns `image` and `text` (plus whatever else it had)."""
    if source.name == "shapes":
        dd = shapes_dataset(source.shapes, cache_dir=source.cache_dir)
    else:
        path = Path(source.name)
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
            dd = datasets.load_from_disk(str(path))
        elif path.is_dir():
            dd = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=source.cache_dir)
        else:
            dd = datasets.load_dataset(source.name, data_dir=source.data_dir, cache_dir=source.cache_dir)
    if isinstance(dd, datasets.Dataset):
        dd = datasets.DatasetDict({"train": dd})
    if split not in dd:
        raise ValueError(f"{source.name!r} has no split {split!r}; it has {list(dd)}.")
    return _rename_columns(dd[split], source, split)
