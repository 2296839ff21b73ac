"""Reconstruct any image files through a trained image tokenizer: originals above, reconstructions below.

Command line: unimodal reconstruct --tokenizer runs/shapes-tokenizer/export --images a.png b.jpg --out grid.png
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from unimodal.data.images import image_to_tensor
from unimodal.tokenizers.image import ImageTokenizer, psnr, ssim
from unimodal.viz import make_grid


def load_images(paths: list[str | Path], resolution: int) -> torch.Tensor:
    """Image files (any mode and size) -> (B, 3, R, R) in [-1, 1], resized and centre-cropped."""
    tensors = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"no image file {path}; pass existing files to --images")
        try:
            with Image.open(path) as im:
                tensors.append(image_to_tensor(im, resolution))
        except UnidentifiedImageError as err:
            raise ValueError(f"{path} is not an image PIL can read (png, jpg, ...)") from err
    return torch.stack(tensors)


@torch.no_grad()
def reconstruct(tokenizer: ImageTokenizer, images: torch.Tensor, decoder: str = "auto", seed: int = 0,
                batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(B, 3, R, R) -> (their codes, the images decoded from them by `decoder`), in batches. A diffusion
    decoder samples: it draws under `seed` without touching the caller's random state."""
    codes = torch.cat([tokenizer.encode(x) for x in images.split(batch_size)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return codes, torch.cat([tokenizer.decode(c, decoder) for c in codes.split(batch_size)])


def reconstruction_grid(tokenizer_dir: str | Path, image_paths: list[str | Path], out: str | Path,
                        cell: int = 128) -> dict[str, float]:  # fmt: skip
    """Write the grid (originals row(s) above, reconstructions below); return mean PSNR and SSIM."""
    tokenizer = ImageTokenizer.from_pretrained(tokenizer_dir)
    images = load_images(image_paths, tokenizer.config.resolution)
    _, recon = reconstruct(tokenizer, images)
    n = images.shape[0]
    ncol = min(n, 8)
    rows = []
    for start in range(0, n, ncol):  # each block of 8: originals, then their reconstructions
        rows += [images[start : start + ncol], recon[start : start + ncol]]
        pad = ncol - rows[-1].shape[0]
        if pad:
            blank = torch.ones(pad, *images.shape[1:])
            rows[-2], rows[-1] = torch.cat([rows[-2], blank]), torch.cat([rows[-1], blank])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    make_grid(torch.cat(rows), ncol=ncol, cell=cell).save(out)
    return {"images": n, "psnr": float(psnr(recon, images).mean()), "ssim": float(ssim(recon, images).mean())}
