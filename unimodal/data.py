"""Image-caption data: the built-in shapes dataset, loading any image+text dataset, image transforms.

Every source ends up as a `datasets.Dataset` with an `image` column (`datasets.Image`) and a `text`
column (str); other column names are mapped by `DataSource`. Images become float tensors in [-1, 1]
of shape (3, R, R): RGB, shorter side resized to R, centre-cropped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------- the shapes world

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "yellow": (240, 220, 40),
    "green": (40, 190, 60),
    "cyan": (40, 215, 225),
    "blue": (45, 85, 235),
    "purple": (165, 60, 215),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
# Positions are the four quadrants, so each place holds at most one object.
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
# Colour-shape pairs that never occur in `train` (every colour and shape still does); the
# `heldout` split has at least one of them in every image.
HELDOUT_PAIRS = (("red", "triangle"), ("green", "circle"), ("blue", "cross"), ("yellow", "square"))

TEMPLATES_ONE = (
    "a {size} {color} {shape} at the {position}",
    "{color} {shape}, {position}, {size}",
    "there is a {size} {color} {shape} in the {position}",
    "{position}: a {color} {shape}, {size}",
)
BACKGROUNDS = {"plain": [(0, 0, 0)], "varied": [(0, 0, 0), (60, 60, 60), (30, 35, 70), (70, 50, 35)]}


@dataclass
class ShapesConfig:
    """The built-in synthetic dataset. Deterministic given the seeds; generated in seconds."""

    resolution: int = 32
    train_size: int = 20000
    test_size: int = 500
    heldout_size: int = 500
    max_objects: int = 2
    background: str = "plain"  # "plain" (black) or "varied"
    seed: int = 0

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {sorted(BACKGROUNDS)}, got {self.background!r}")
        if not 1 <= self.max_objects <= len(POSITIONS):
            raise ValueError(f"max_objects must be in 1..{len(POSITIONS)}, got {self.max_objects}")
        if self.resolution < 16:
            raise ValueError(f"resolution must be >= 16 pixels, got {self.resolution}")


def caption_for(objects: list[dict], rng: random.Random) -> str:
    """One caption for a scene; one template per object, joined with 'and'."""
    return " and ".join(rng.choice(TEMPLATES_ONE).format(**o) for o in objects)


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict, center: tuple[float, float], radius: float):
    cx, cy = center
    fill = COLORS[obj["color"]]
    r = radius
    if obj["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj["shape"] == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif obj["shape"] == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif obj["shape"] == "cross":
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def render_scene(objects: list[dict], resolution: int, background=(0, 0, 0), jitter=None) -> Image.Image:
    """Draw objects (dicts with color/shape/size/position) at 4x and downsample (anti-aliased edges).

    `jitter` is one (dx, dy) offset per object, in quarters of the image side (default: centred).
    """
    jitter = jitter or [(0.0, 0.0)] * len(objects)
    scale = 4
    size = resolution * scale
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    quarter = size / 4
    for obj, (dx, dy) in zip(objects, jitter):
        row, col = divmod(POSITIONS.index(obj["position"]), 2)
        radius = quarter * (0.45 if obj["size"] == "small" else 0.8)
        center = (quarter * (1 + 2 * col) + dx * quarter, quarter * (1 + 2 * row) + dy * quarter)
        _draw_object(draw, obj, center, radius)
    return img.resize((resolution, resolution), Image.BOX)


def _sample_scene(rng: random.Random, max_objects: int, split: str) -> list[dict]:
    heldout = set(HELDOUT_PAIRS)
    while True:
        n = rng.randint(1, max_objects)
        places = rng.sample(POSITIONS, n)
        objects = [
            dict(color=rng.choice(list(COLORS)), shape=rng.choice(SHAPES), size=rng.choice(SIZES), position=p)
            for p in places
        ]
        has_heldout = any((o["color"], o["shape"]) in heldout for o in objects)
        if split == "heldout":
            if not has_heldout:  # force one object onto a held-out pair: every heldout image has one
                o = rng.choice(objects)
                o["color"], o["shape"] = rng.choice(HELDOUT_PAIRS)
            return objects
        if split in ("train", "test") and has_heldout:
            continue
        return objects


def _generate(split: str, n: int, resolution: int, max_objects: int, background: str, seed: int):
    # A distinct stream per split, so `test` is never a copy of part of `train`.
    rng = random.Random(f"{seed}-{split}")
    for _ in range(n):
        objects = _sample_scene(rng, max_objects, split)
        jitter = [(rng.uniform(-0.12, 0.12), rng.uniform(-0.12, 0.12)) for _ in objects]
        image = render_scene(objects, resolution, rng.choice(BACKGROUNDS[background]), jitter)
        yield {
            "image": image,
            "text": caption_for(objects, rng),
            "colors": [o["color"] for o in objects],
            "shapes": [o["shape"] for o in objects],
            "sizes": [o["size"] for o in objects],
            "positions": [o["position"] for o in objects],
        }


SHAPES_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "text": datasets.Value("string"),
        "colors": datasets.Sequence(datasets.Value("string")),
        "shapes": datasets.Sequence(datasets.Value("string")),
        "sizes": datasets.Sequence(datasets.Value("string")),
        "positions": datasets.Sequence(datasets.Value("string")),
    }
)


def shapes_dataset(config: ShapesConfig | None = None, cache_dir: str | None = None) -> datasets.DatasetDict:
    """The built-in dataset as splits `train`, `test`, `heldout` (cached by `datasets` after the first call)."""
    config = config or ShapesConfig()
    sizes = {"train": config.train_size, "test": config.test_size, "heldout": config.heldout_size}
    splits = {}
    for split, n in sizes.items():
        splits[split] = datasets.Dataset.from_generator(
            _generate,
            gen_kwargs=dict(
                split=split,
                n=n,
                resolution=config.resolution,
                max_objects=config.max_objects,
                background=config.background,
                seed=config.seed,
            ),
            features=SHAPES_FEATURES,
            cache_dir=cache_dir,
            split=datasets.NamedSplit(split),
        )
    return datasets.DatasetDict(splits)


def scene_from_row(row: dict) -> list[dict]:
    """The objects of a shapes row (inverse of the attribute columns)."""
    keys = ("colors", "shapes", "sizes", "positions")
    return [dict(color=c, shape=s, size=z, position=p) for c, s, z, p in zip(*(row[k] for k in keys))]


# ----------------------------------------------------------------------------- any image-caption data


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


# ----------------------------------------------------------------------------- image transforms


class BadImageError(ValueError):
    """An image that cannot be read (corrupt, truncated, not an image)."""


def open_image(value) -> Image.Image:
    """A PIL image, a path, or an undecoded `datasets.Image` value ({"bytes", "path"}) -> loaded PIL image."""
    import io

    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict | str | Path):
            image = Image.open(value["path"] if isinstance(value, dict) else value)
        else:
            raise BadImageError(f"not an image: {type(value).__name__}")
        image.load()  # decode now: truncated files fail here, not later inside a DataLoader
        return image
    except BadImageError:
        raise
    except Exception as err:  # PIL raises many types for bad files (OSError, SyntaxError, ValueError, ...)
        where = value.get("path") if isinstance(value, dict) else value
        raise BadImageError(f"cannot read image {where if isinstance(where, str | Path) else ''}: {err}") from err


def decode_or_skip(values: list) -> tuple[list[Image.Image], list[int]]:
    """Decode a batch of image values; returns the good images and the indices of the unreadable ones."""
    images, bad = [], []
    for i, value in enumerate(values):
        try:
            images.append(open_image(value))
        except BadImageError:
            bad.append(i)
    return images, bad


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, I;16, ...) to RGB; transparency is composited on black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        arr = (arr / max(arr.max(), 1.0) * 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if image.mode in ("P", "LA", "PA") or "A" in image.mode:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def image_to_uint8(image: Image.Image, resolution: int) -> torch.Tensor:
    """PIL image -> uint8 tensor (3, R, R): RGB, shorter side resized to R, centre crop."""
    image = to_rgb(image)
    w, h = image.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, R, R)


def uint8_to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., 3, R, R) -> float in [-1, 1]."""
    return pixels.float().div(127.5).sub(1.0)


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """PIL image -> float tensor (3, R, R) in [-1, 1]: RGB, shorter side resized to R, centre crop."""
    return uint8_to_float(image_to_uint8(image, resolution))


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> PIL RGB image."""
    arr = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def images_to_tensor(images, resolution: int) -> torch.Tensor:
    """A list of PIL images -> (B, 3, R, R) in [-1, 1]."""
    return torch.stack([image_to_tensor(im, resolution) for im in images])
