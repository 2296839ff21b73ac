"""The VQ decoder and the diffusion decoder on the same codes: fidelity, distribution and time.

For real images of a split: encode once, decode the same codes with the VQ decoder and with the
diffusion decoder at each number of sampling steps, and report per decoder
- PSNR and SSIM to the originals (pixel fidelity: a sampler that adds plausible detail that is not
  the original's can lose PSNR while looking sharper),
- the Fréchet distance of the decoded images to the originals in a feature space trained on real
  images only (the built-in shapes: the judge's features; other data: the evaluation FeatureNet);
  0 is a perfect copy. For scale, the distance between the originals and as many *other* real
  images (training split) is printed too: it holds different scenes, so at a few hundred images it
  is mostly the sampling noise of the estimate, not a bound decoders must stay under,
- milliseconds per image at batch 1 and at the full batch (the cost of each sampling step).

    unimodal decoder compare --tokenizer runs/shapes-decoder/export --split test --steps 5 10 20 50
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from unimodal.data.images import images_to_tensor
from unimodal.data.pairs import DataSource, load_pairs
from unimodal.data.shapes import ShapesConfig
from unimodal.evaluation.realdata import feature_net_for, frechet_distance, seeded_subset
from unimodal.timing import time_it
from unimodal.tokenizers.image import ImageTokenizer, psnr, ssim
from unimodal.viz import make_grid


def real_images(source: DataSource, split: str, resolution: int, num_images: int, seed: int = 0) -> torch.Tensor:
    """`num_images` images of a split, (N, 3, R, R) in [-1, 1]: its `seeded_subset`, as `evaluate` takes."""
    if source.name == "shapes":
        source = DataSource(name="shapes", shapes=ShapesConfig(**{**source.shapes.__dict__, "resolution": resolution}),
                            cache_dir=source.cache_dir)  # fmt: skip
    ds = load_pairs(source, split)
    ds = ds.select(seeded_subset(len(ds), num_images, seed))
    return images_to_tensor(list(ds["image"]), resolution, source.background)


def feature_fn(source: DataSource, resolution: int, cache_dir: str | Path):
    """images -> features of the data's evaluation network (trained once on real training images, cached)."""
    if source.name == "shapes":
        from unimodal.evaluation.judge import JudgeConfig, load_or_train_judge

        judge = load_or_train_judge(Path(cache_dir) / "judge", JudgeConfig(resolution=resolution))
        return judge.embed
    net, _, _ = feature_net_for(source, resolution, Path(cache_dir) / "features")
    return net.embed


@torch.no_grad()
def compare_decoders(
    tokenizer: ImageTokenizer,
    images: torch.Tensor,
    features,
    reference: torch.Tensor | None = None,
    steps: tuple[int, ...] = (5, 10, 20, 50),
    batch_size: int = 64,
    seed: int = 0,
    grid_path: str | Path | None = None,
) -> dict:
    """Rows for the VQ decoder and the diffusion decoder at each of `steps` (see the module docstring).
    `reference`: as many other real images (e.g. of the training split), for the Fréchet scale."""
    if tokenizer.pixel_decoder is None:
        raise ValueError("this image tokenizer has no diffusion decoder; train one with `unimodal decoder fit`")
    codes = torch.cat([tokenizer.encode(x) for x in images.split(batch_size)])
    real = features(images)
    decoders = [("vq", None, lambda c: tokenizer.decode(c, "vq"))]
    for s in steps:
        decoders.append(("diffusion", s, lambda c, s=s: tokenizer.pixel_decoder.decode(tokenizer, c, steps=s)))
    rows, shown = [], []
    for name, n_steps, decode in tqdm(decoders, desc="decoders"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = torch.cat([decode(c) for c in codes.split(batch_size)])
            batch, one = codes[:batch_size], codes[:1]
            ms_batch = time_it(lambda: decode(batch), repeats=3, warmup=0) / len(batch) * 1000  # noqa: B023
            ms_one = time_it(lambda: decode(one), repeats=3, warmup=0) * 1000  # noqa: B023
        rows.append({
            "decoder": name, "steps": n_steps, "psnr": float(psnr(out, images).mean()),
            "ssim": float(ssim(out, images).mean()), "fd": frechet_distance(features(out), real),
            "ms_per_image_batch1": ms_one, "ms_per_image_batch": ms_batch,
        })  # fmt: skip
        shown.append(out[:8])
    result = {"images": images.shape[0], "batch_size": min(batch_size, codes.shape[0]), "rows": rows,
              "parameters": {"diffusion_decoder": sum(p.numel() for p in tokenizer.pixel_decoder.parameters()),
                             "vq_decoder": sum(p.numel() for p in tokenizer.decoder.parameters())}}  # fmt: skip
    if reference is not None:
        result["fd_other_real_images"] = frechet_distance(features(reference), real)
    if grid_path is not None:
        labels = ["original"] * len(shown[0]) + [f"{r['decoder']} {r['steps'] or ''}".strip() for r in rows
                                                 for _ in range(len(shown[0]))]  # fmt: skip
        Path(grid_path).parent.mkdir(parents=True, exist_ok=True)
        make_grid(torch.cat([images[:8], *shown]), labels, ncol=len(shown[0])).save(grid_path)
    return result


def format_table(result: dict) -> str:
    b = result["batch_size"]
    lines = [f"| decoder | steps | PSNR | SSIM | FD | ms/image batch 1 | ms/image batch {b} |", "|---" * 7 + "|"]
    for r in result["rows"]:
        lines.append(f"| {r['decoder']} | {r['steps'] or '-'} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['fd']:.3f} "
                     f"| {r['ms_per_image_batch1']:.1f} | {r['ms_per_image_batch']:.2f} |")  # fmt: skip
    if "fd_other_real_images" in result:
        lines.append(f"FD of as many other real images (different scenes; scale): {result['fd_other_real_images']:.3f}")
    p = result["parameters"]
    lines.append(f"parameters: diffusion decoder {p['diffusion_decoder']:,}, VQ decoder {p['vq_decoder']:,}")
    return "\n".join(lines)
