"""Image tokenizer throughput: encode (pixels -> codes) and decode (codes -> pixels) images/s per
quantizer variant, at batch 1 and 64, with MFU against this machine's measured matmul peak.

    python -m unimodal.bench tokenizer                                  # fresh K=1024 models, all 5 quantizers
    python -m unimodal.bench tokenizer --tokenizers runs/tokenizers/*/export   # trained folders (or bundles)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from unimodal.tokenizers.image import CONFIG_FILE, ImageTokenizer, ImageTokenizerConfig
from unimodal.tokenizers.quantizers import QUANTIZERS

from .common import describe_peak, measured_peak_flops, peak_info, print_table, time_it

# The architecture of experiments/tokenizers/vq.yaml; only the quantizer changes between variants.
BASE = dict(resolution=32, channels=16, channel_mult=[2, 4], num_res_blocks=1, code_dim=32, codebook_size=1024)


def _fresh(name: str) -> ImageTokenizer:
    return ImageTokenizer(ImageTokenizerConfig(**BASE, quantizer=name)).eval()


def _load(path: str) -> ImageTokenizer:
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file() and (folder / "image_tokenizer" / CONFIG_FILE).is_file():
        folder = folder / "image_tokenizer"  # a bundle
    return ImageTokenizer.from_pretrained(folder)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def bench_one(label: str, tok: ImageTokenizer, batch_sizes: list[int], peak: float, device: str, repeats: int):
    tok = tok.to(device)
    r = tok.config.resolution
    rows = []
    for b in batch_sizes:
        images = torch.rand(b, 3, r, r, device=device) * 2 - 1
        codes = tok.encode(images)
        row = {"tokenizer": label, "quantizer": tok.config.quantizer, "K": tok.codebook_size, "batch": b}
        encode, decode = (lambda x=images: tok.encode(x)), (lambda c=codes: tok.decode(c))
        for what, fn in (("encode", encode), ("decode", decode)):
            seconds = time_it(fn, repeats=repeats, warmup=2, device=device)
            row[f"{what} img/s"] = b / seconds
            row[f"{what} MFU"] = _flops(fn) / seconds / peak
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unimodal.bench tokenizer", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizers", nargs="*", default=None, help="tokenizer or bundle folders (default: fresh models)")
    p.add_argument("--variants", nargs="*", default=list(QUANTIZERS), help="quantizers for fresh models")
    p.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 64])
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the table here")
    args = p.parse_args(argv)
    unknown = set(args.variants) - set(QUANTIZERS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(QUANTIZERS)}")
    torch.manual_seed(0)
    peak = measured_peak_flops(args.device)
    if args.tokenizers:
        models = [(str(Path(d)), _load(d)) for d in args.tokenizers]
    else:
        models = [(f"fresh-{v}", _fresh(v)) for v in args.variants]
    rows = [row for label, tok in models for row in bench_one(label, tok, args.batch_sizes, peak, args.device,
                                                                args.repeats)]  # fmt: skip
    extra = {"device": args.device, "peak_flops": peak, "peak": peak_info(peak), "threads": torch.get_num_threads()}
    print(f"{args.device}: measured peak {peak / 1e9:.1f} GFLOP/s{describe_peak(peak)}")
    print_table(f"image tokenizer throughput ({args.device}, peak {peak / 1e9:.1f} GFLOP/s)", rows, args.json, extra)
    return 0
