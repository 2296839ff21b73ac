"""Captioning accuracy on the built-in shapes splits.

Each caption is parsed back into colour, shape, size and position per object and scored exactly
like the judge scores generated images (`judge.scene_match`).
"""

from __future__ import annotations

from unimodal.data.images import images_to_tensor
from unimodal.data.pairs import DataSource, load_pairs
from unimodal.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, ShapesConfig
from unimodal.evaluation.judge import scene_labels, scene_match
from unimodal.generation.caption import caption_images
from unimodal.generation.sampling import SamplingParams


def parse_caption(caption: str) -> dict[str, list[str]]:
    """A shapes caption -> {colors, shapes, sizes, positions} lists, one entry per object clause.

    Clauses are split on " and "; a clause without a recognisable colour, shape and position is
    dropped (size defaults to "small" when missing), so a garbled caption scores as wrong.
    """
    parsed = {"colors": [], "shapes": [], "sizes": [], "positions": []}
    for clause in caption.lower().split(" and "):
        words = clause.replace(",", " ").replace(":", " ").split()
        color = next((w for w in words if w in COLORS), None)
        shape = next((w for w in words if w in SHAPES), None)
        size = next((w for w in words if w in SIZES), "small")
        position = next((p for p in POSITIONS if p in " ".join(words)), None)
        if color and shape and position:
            for key, value in zip(parsed, (color, shape, size, position)):
                parsed[key].append(value)
    return parsed


def captioning_accuracy(
    bundle, split: str, num_images: int = 200, params: SamplingParams | None = None, shapes: ShapesConfig | None = None
) -> dict:
    """Caption the split's real images; fraction whose caption names every object right (scene),
    and per attribute (colour, shape, position of every object; size)."""
    resolution = bundle.image_tokenizer.config.resolution
    shapes = shapes or ShapesConfig(resolution=resolution)
    ds = load_pairs(DataSource(name="shapes", shapes=shapes), split)
    rows = [ds[i] for i in range(min(num_images, len(ds)))]
    captions = caption_images(bundle, images_to_tensor([r["image"] for r in rows], resolution), params)
    truth, pred = scene_labels(rows), scene_labels([parse_caption(c) for c in captions])
    match = scene_match(pred, truth)
    size = (pred["size"] == truth["size"]).all(1)
    rates = {k: float(v.float().mean()) for k, v in match.items()}
    return {
        "split": split,
        "num_images": len(rows),
        "caption_accuracy": rates.pop("scene"),
        "accuracy_by_attribute": {**rates, "size": float(size.float().mean())},
        "examples": [{"truth": r["text"], "caption": c} for r, c in zip(rows[:8], captions[:8])],
    }
