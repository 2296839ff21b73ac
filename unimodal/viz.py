"""Pictures for people: labelled image grids and the codebook-usage chart. No generation, no Lightning."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from unimodal.data.images import tensor_to_image


def _wrap(text: str, width: int) -> list[str]:
    lines = [""]
    for word in text.split():
        if lines[-1] and len(lines[-1]) + 1 + len(word) > width:
            lines.append("")
        lines[-1] = f"{lines[-1]} {word}".strip()
    return lines


def make_grid(images: torch.Tensor, labels: list[str] | None = None, ncol: int = 8, cell: int = 128) -> Image.Image:
    """Images (B, 3, H, W) in [-1, 1] -> one PIL grid, each cell upscaled to `cell` px under its wrapped label."""
    n = images.shape[0]
    ncol = max(1, min(ncol, n))
    nrow = (n + ncol - 1) // ncol
    wrapped = [_wrap(label, cell // 6) for label in labels] if labels else []
    label_h = 11 * max((len(w) for w in wrapped), default=0) + (4 if labels else 0)
    grid = Image.new("RGB", (ncol * cell, nrow * (cell + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i in range(n):
        r, c = divmod(i, ncol)
        x, y = c * cell, r * (cell + label_h)
        grid.paste(tensor_to_image(images[i]).resize((cell, cell), Image.NEAREST), (x, y + label_h))
        if labels:
            draw.multiline_text((x + 2, y + 1), "\n".join(wrapped[i]), fill=(0, 0, 0), font=font, spacing=1)
    return grid


def save_grid(images: torch.Tensor, path, labels: list[str] | None = None, ncol: int = 8) -> Image.Image:
    """`make_grid`, written to `path` (PNG; parent folders are created)."""
    from pathlib import Path

    grid = make_grid(images, labels, ncol=ncol)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


def usage_histogram(counts: torch.Tensor):
    """Per-code use counts (K,) -> a PIL bar chart, codes sorted by use (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.5), dpi=100)
    ordered = counts.sort(descending=True).values.numpy()
    ax.bar(range(len(ordered)), ordered + 1, width=1.0)
    ax.set_yscale("log")
    ax.set_xlabel(f"code rank ({int((counts > 0).sum())}/{len(ordered)} used)")
    ax.set_ylabel("uses + 1")
    fig.tight_layout()
    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    plt.close(fig)
    return image
