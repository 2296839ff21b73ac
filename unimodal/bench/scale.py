"""`python -m unimodal.bench scale`: a dataset larger than memory, from pictures to stage-2 batches.

Builds N synthetic image-caption pairs (the built-in shapes generator, PNGs in `datasets` Arrow files),
extracts their image codes once into Parquet shards (`unimodal extract`'s code path), then streams one
epoch of stage-2 batches from the shards (`SequenceDataModule(codes=..., streaming=True)`). For each
phase: wall time, rows/s and the process's peak resident memory (Linux VmHWM, reset between phases),
plus resident memory sampled while streaming, to show it stays flat.

    python -m unimodal.bench scale --pairs 1000000 --workdir /tmp/scale --json scale.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from unimodal.data.codes import extract_codes
from unimodal.data.pairs import DataSource, load_pairs
from unimodal.data.shapes import ShapesConfig
from unimodal.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from unimodal.tokenizers.text import TextTokenizer
from unimodal.training.datamodules import SequenceDataModule


def _memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak():
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _phase(name: str, rows: int, fn) -> dict:
    _reset_peak()
    start = time.perf_counter()
    extra = fn() or {}
    seconds = time.perf_counter() - start
    result = {"phase": name, "rows": rows, "seconds": round(seconds, 1), "rows_per_s": round(rows / seconds, 1),
              "peak_rss_mb": round(_memory_mb("VmHWM"), 1), **extra}  # fmt: skip
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m unimodal.bench scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--pairs", type=int, default=100_000, help="synthetic pairs to build (default 100000)")
    p.add_argument("--workdir", default=None, help="where data, shards and caches go (default: a temporary folder)")
    p.add_argument("--tokenizer", default=None,
                   help="trained image tokenizer (default: untrained, the size of the shapes recipe's)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, help="stage-2 batch size")
    p.add_argument("--rows-per-shard", type=int, default=100_000)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        source = DataSource(shapes=ShapesConfig(train_size=args.pairs, test_size=256, heldout_size=16),
                            cache_dir=str(work / "hf_cache"))  # fmt: skip
        phases = [_phase("build pairs", args.pairs, lambda: load_pairs(source, "train") and None)]

        tok_dir = Path(args.tokenizer) if args.tokenizer else work / "image_tokenizer"
        if not args.tokenizer:
            # the size of experiments/shapes/tokenizer.yaml's
            ImageTokenizer(ImageTokenizerConfig(channels=16)).save_pretrained(tok_dir)
        tok = ImageTokenizer.from_pretrained(tok_dir).eval()
        codes = work / "codes"
        phases.append(_phase("extract codes", args.pairs + 256, lambda: extract_codes(
            tok, tok_dir, source, codes, ("train", "test"), rows_per_shard=args.rows_per_shard) and None))  # fmt: skip

        text_dir = work / "text_tokenizer"
        TextTokenizer.train(load_pairs(source, "test")["text"], vocab_size=512).save(text_dir)
        data = SequenceDataModule(str(tok_dir), str(text_dir), source=source, batch_size=args.batch_size,
                                  codes=str(codes), streaming=True)  # fmt: skip
        data.setup("fit")

        def stream():
            samples, seen, every = [], 0, max(1, args.pairs // args.batch_size // 20)
            for i, batch in enumerate(data.train_dataloader()):
                seen += batch["input_ids"].shape[0]
                if i % every == 0:
                    samples.append(round(_memory_mb("VmRSS"), 1))
            return {"rows_streamed": seen, "rss_mb_during": samples}

        phases.append(_phase("stream one epoch of stage-2 batches", args.pairs, stream))
    if args.json:
        Path(args.json).write_text(json.dumps({"pairs": args.pairs, "phases": phases}, indent=2))
    return 0
