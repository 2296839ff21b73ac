"""Image transforms: any PIL image (mode, size) -> float tensor (3, R, R) in [-1, 1], and back.

RGB, shorter side resized to R, centre-cropped; transparency composited onto a background colour
(white by default: emoji and icons drawn on transparency must not come out on black). Pillow and
torch only (no torchvision).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageColor

BACKGROUND = "white"


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


def background_rgb(background: str) -> tuple[int, int, int]:
    """A colour name or "#rrggbb" -> (r, g, b), with an error that says what is accepted."""
    try:
        return ImageColor.getrgb(background)[:3]
    except ValueError as err:
        raise ValueError(f"background {background!r} is not a colour: use a name (white, gray) or #rrggbb") from err


def to_rgb(image: Image.Image, background: str = BACKGROUND) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, I;16, ...) to RGB; transparency is composited on `background`."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        arr = (arr / max(arr.max(), 1.0) * 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if image.mode in ("P", "LA", "PA") or "A" in image.mode:
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (*background_rgb(background), 255))
        return Image.alpha_composite(canvas, image).convert("RGB")
    return image.convert("RGB")


def image_to_uint8(image: Image.Image, resolution: int, background: str = BACKGROUND) -> torch.Tensor:
    """PIL image -> uint8 tensor (3, R, R): RGB (transparency on `background`), shorter side to R, centre crop."""
    image = to_rgb(image, background)
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


def image_to_tensor(image: Image.Image, resolution: int, background: str = BACKGROUND) -> torch.Tensor:
    """PIL image -> float tensor (3, R, R) in [-1, 1]: RGB, shorter side resized to R, centre crop."""
    return uint8_to_float(image_to_uint8(image, resolution, background))


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> PIL RGB image."""
    arr = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def images_to_tensor(images, resolution: int, background: str = BACKGROUND) -> torch.Tensor:
    """A list of PIL images -> (B, 3, R, R) in [-1, 1]."""
    return torch.stack([image_to_tensor(im, resolution, background) for im in images])
