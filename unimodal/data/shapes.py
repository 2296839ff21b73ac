"""The built-in shapes dataset: 32x32 scenes of one or two coloured shapes with template captions.

Splits `train`, `test` (same distribution) and `heldout` (every image holds a colour-shape pair never
trained on). Built once per config and cached by `datasets`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import datasets
from PIL import Image, ImageDraw

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
