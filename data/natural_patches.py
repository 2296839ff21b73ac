"""Build a small natural-image dataset from the photos shipped inside scikit-image (no download).

Each photo is cut into overlapping square patches at two scales (the crop is resized to
`--resolution`), flipped for augmentation, and saved with `DatasetDict.save_to_disk` as splits:

- `train`: patches of the training photos,
- `test`: patches of *other* photos (never seen in training) - held-out PSNR is measured here.

Captions are the photo's name ("a photo patch: coffee"), so the same folder also works as stage-2
data. Needs `pip install scikit-image`.

    python data/natural_patches.py --out data/cache/natural32   # then: --data.source.name data/cache/natural32
"""

from __future__ import annotations

import argparse
import warnings

import datasets
import numpy as np
from PIL import Image

TRAIN_PHOTOS = ("astronaut", "immunohistochemistry", "hubble_deep_field", "retina", "colorwheel", "camera", "coins",
                "moon", "grass", "gravel", "brick", "cell", "page", "text", "clock")  # fmt: skip
TEST_PHOTOS = ("chelsea", "coffee", "rocket")  # held-out colour photos (skimage `cat` = `chelsea`: unused)


def _photo(name: str) -> Image.Image:
    import skimage.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")


def patches(image: Image.Image, resolution: int, scales: tuple[int, ...], stride_frac: float) -> list[Image.Image]:
    """Square crops of side resolution * s for each scale s, on a grid of stride side * stride_frac,
    each resized to `resolution`, plus their horizontal flips."""
    out = []
    w, h = image.size
    for s in scales:
        side = resolution * s
        step = max(1, int(side * stride_frac))
        for top in range(0, h - side + 1, step):
            for left in range(0, w - side + 1, step):
                crop = image.crop((left, top, left + side, top + side))
                crop = crop.resize((resolution, resolution), Image.BICUBIC) if s != 1 else crop
                out += [crop, crop.transpose(Image.FLIP_LEFT_RIGHT)]
    return out


def build(resolution: int = 32, scales=(2, 4), stride_frac: float = 0.5) -> datasets.DatasetDict:
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    splits = {}
    for split, names in (("train", TRAIN_PHOTOS), ("test", TEST_PHOTOS)):
        rows = {"image": [], "text": []}
        for name in names:
            for p in patches(_photo(name), resolution, scales, stride_frac):
                rows["image"].append(p)
                rows["text"].append(f"a photo patch: {name.replace('_', ' ')}")
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    return datasets.DatasetDict(splits)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/cache/natural32", help="folder for save_to_disk (git-ignored)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--scales", type=int, nargs="+", default=[2, 4], help="crop side = resolution * scale")
    p.add_argument("--stride", type=float, default=0.5, help="crop stride as a fraction of the crop side")
    args = p.parse_args()
    dd = build(args.resolution, tuple(args.scales), args.stride)
    dd.save_to_disk(args.out)
    print({k: len(v) for k, v in dd.items()}, "->", args.out)


if __name__ == "__main__":
    main()
