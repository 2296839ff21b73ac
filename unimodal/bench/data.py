"""`python -m unimodal.bench data`: input-pipeline samples/s against the rate the model consumes them.

Times, on the built-in shapes data: decoding+resizing images (stage 1's first pass), serving
pre-decoded stage-1 batches, pre-tokenizing pairs (image tokenizer + BPE, stage 2's first pass),
and serving pre-tokenized stage-2 batches. The consumption rate is one timed training step of the
default models on the same batch size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from unimodal.data.pairs import DataSource, load_pairs
from unimodal.data.shapes import ShapesConfig
from unimodal.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from unimodal.training.datamodules import ImageDataModule, SequenceDataModule
from unimodal.training.modules import TokenizerModule, TransformerModule

from .common import print_table, time_it


def _drain(loader, limit: int) -> tuple[int, float]:
    start, n = time.perf_counter(), 0
    for i, batch in enumerate(loader):
        n += (batch["input_ids"] if isinstance(batch, dict) else batch).shape[0]
        if i + 1 >= limit:
            break
    return n, time.perf_counter() - start


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m unimodal.bench data", description=__doc__)
    p.add_argument("--samples", type=int, default=4096, help="train images to generate and process")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--pin-memory", choices=["auto", "on", "off"], default="auto",
                   help="page-locked batches (auto: when CUDA is present; only host-to-GPU copies gain)")  # fmt: skip
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    loading = {"num_workers": args.num_workers, "pin_memory": {"auto": None, "on": True, "off": False}[args.pin_memory]}

    with tempfile.TemporaryDirectory() as tmp:
        source = DataSource(shapes=ShapesConfig(train_size=args.samples, test_size=64, heldout_size=64), cache_dir=tmp)
        load_pairs(source, "train")  # generate the data outside the timings
        rows = []

        images = ImageDataModule(source=source, batch_size=args.batch_size, **loading)
        start = time.perf_counter()
        images.setup("fit")  # decode + resize + cache
        rows.append(
            {"stage": "1: decode+resize (first pass)", "samples/s": args.samples / (time.perf_counter() - start)}
        )
        n, seconds = _drain(images.train_dataloader(), 10**9)
        rows.append({"stage": "1: serve pre-decoded batches", "samples/s": n / seconds})
        tok_module = TokenizerModule()
        batch = next(iter(images.train_dataloader()))
        step = time_it(lambda: tok_module.tokenizer(batch)[1].loss.backward(), repeats=3)
        consume1 = args.batch_size / step
        rows.append({"stage": "1: model consumes (fwd+bwd)", "samples/s": consume1})

        ImageTokenizer(ImageTokenizerConfig()).save_pretrained(Path(tmp) / "tok")
        seqs = SequenceDataModule(
            image_tokenizer=str(Path(tmp) / "tok"), text_tokenizer=str(Path(tmp) / "bpe"), source=source,
            batch_size=args.batch_size, **loading,
        )  # fmt: skip
        start = time.perf_counter()
        seqs.setup("fit")  # encode images + BPE + cache
        rows.append(
            {"stage": "2: pre-tokenize (first pass)", "samples/s": args.samples / (time.perf_counter() - start)}
        )
        n, seconds = _drain(seqs.train_dataloader(), 10**9)
        rows.append({"stage": "2: serve pre-tokenized batches", "samples/s": n / seconds})
        lm = TransformerModule(vocab=seqs.vocab)
        batch = next(iter(seqs.train_dataloader()))
        step = time_it(lambda: lm._loss(batch)[0].backward(), repeats=3)
        consume2 = args.batch_size / step
        rows.append({"stage": "2: model consumes (fwd+bwd)", "samples/s": consume2})

    ratios = {"stage1_serve_over_consume": rows[1]["samples/s"] / consume1,
              "stage2_serve_over_consume": rows[4]["samples/s"] / consume2}  # fmt: skip
    print_table("input pipeline", rows, args.json, ratios)
    for k, v in ratios.items():
        print(f"{k}: {v:.1f}x")
    return 0
