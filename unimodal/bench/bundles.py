"""`python -m unimodal.bench bundles`: seconds per generated image of trained bundles side by side,
whatever their image representation (raster codes, next-scale codes, continuous tokens with a
diffusion head, codes with a diffusion decoder), at each batch size, and for the diffusion parts at
each number of sampling steps: the trade-off between steps and time.

    python -m unimodal.bench bundles --bundles runs/a/export runs/b/export --batches 1 64 --steps 10 25 50 100

A bundle with a diffusion head (continuous tokens) is timed at every `--steps` of its head; a bundle
whose tokenizer has a diffusion decoder at every `--steps` of the decoder (and once with the VQ
decoder); any other bundle once. Each row also names the parameters of the transformer and of the
head or decoder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from unimodal.generation.bundle import Bundle
from unimodal.generation.sampling import SamplingParams

from .common import print_table, time_it

PROMPT = "a large red circle at the top left"


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def variants(bundle: Bundle, steps: list[int]):
    """(label, diffusion steps or None, decoder, set-up) for each way of timing this bundle."""
    head, decoder = bundle.image_head, bundle.image_tokenizer.pixel_decoder
    if head is not None:
        for s in steps:
            yield "diffusion head", s, "auto", lambda s=s: setattr(head.diffloss.config, "sample_steps", s)
    elif decoder is not None:
        yield "VQ decoder", None, "vq", lambda: None
        for s in steps:
            yield "diffusion decoder", s, "auto", lambda s=s: setattr(decoder.config, "sampling_steps", s)
    else:
        yield "VQ decoder", None, "auto", lambda: None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unimodal.bench bundles", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundles", nargs="+", required=True, help="trained bundle folders")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="images per call (default 1 64)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100],
                   help="sampling steps of diffusion heads and decoders (default 10 25 50 100)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=2, help="timed calls per row after a warm-up call (median)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the table here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for path in args.bundles:
        bundle = Bundle.load(path)
        kind = "continuous" if bundle.image_head is not None else (
            "next-scale" if bundle.vocab.image_scales is not None else "raster")  # fmt: skip
        sizes = {"transformer params": _params(bundle.transformer), "head params": _params(bundle.image_head),
                 "decoder params": _params(bundle.image_tokenizer.pixel_decoder)}  # fmt: skip
        for label, steps, decoder, set_up in variants(bundle, args.steps):
            set_up()
            for batch in args.batches:
                params = SamplingParams(seed=0, batch_size=batch, images_per_prompt=batch, decoder=decoder)
                seconds = time_it(lambda b=bundle, params=params: b.generate([PROMPT], params), repeats=args.repeats)
                rows.append({"bundle": Path(path).parent.name or str(path), "tokens": kind, "image out": label,
                             "steps": steps, "batch": batch, "ms/image": 1000 * seconds / batch,
                             "images/s": batch / seconds, **sizes})  # fmt: skip
                print(f"{rows[-1]['bundle']:>20s} {label:>18s} steps {steps or '-':>4} batch {batch:>3}: "
                      f"{rows[-1]['ms/image']:.1f} ms/image", flush=True)  # fmt: skip
    print_table(f"sampling time per image ({torch.get_num_threads()} threads)", rows, args.json,
                {"threads": torch.get_num_threads(), "prompt": PROMPT})  # fmt: skip
    return 0
