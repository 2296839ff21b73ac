"""Image codes extracted once with a trained image tokenizer, in Parquet shards that stage 2 reads or streams.

Stage 2 only needs each image's codes. Encoding every image once (as LlamaGen and MAR cache their codes
and latents) takes the image tokenizer out of the training loop, and lets a dataset that does not fit
in memory stream from disk. The shards are plain Parquet files written with pyarrow (already under
`datasets`): `datasets.load_dataset("parquet", streaming=True)` reads them lazily, and
`split_dataset_by_node` hands each training process its own shards, as the project's streaming path
does for images. (Lightning's litdata would do the same with one more dependency and its own format.)

    OUT/info.json                  tokenizer digest, grid, codebook size, data source, counts, images/s
    OUT/{split}/shard-00000.parquet  rows: codes (int16, h*w, raster order), text, flipped (bool), crop (int8)

Augmentation variants are extra rows with the same caption, as LlamaGen's ten-crop/flip extraction makes
them: with `flip`, every view is also stored mirrored left-right; with `crops=5`, every image also gives
the four corner crops of itself enlarged `crop_scale` times (crop 1-4: top-left, top-right, bottom-left,
bottom-right; crop 0 is the whole image, the view training on images sees). `crops=5` with `flip` is ten
rows per image.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from unimodal.data.images import decode_or_skip, image_to_tensor
from unimodal.data.pairs import DataSource, load_pairs

INFO_FILE = "info.json"
SCHEMA = pa.schema(
    [("codes", pa.list_(pa.int16())), ("text", pa.string()), ("flipped", pa.bool_()), ("crop", pa.int8())]
)
CROPS = (1, 5)  # the whole image; or it and the four corners of it enlarged


def weights_digest(tokenizer_dir: str | Path) -> str:
    """Identity of a trained image tokenizer: the sha256 of its weights file."""
    return hashlib.sha256((Path(tokenizer_dir) / "model.safetensors").read_bytes()).hexdigest()[:16]


class _ShardWriter:
    """Rows into `shard-NNNNN.parquet` files of at most `rows_per_shard` rows each."""

    def __init__(self, folder: Path, rows_per_shard: int):
        self.folder, self.rows_per_shard = folder, rows_per_shard
        self.shard, self.rows, self.writer, self.total = 0, 0, None, 0
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, codes: torch.Tensor, texts: list[str], flipped: bool, crop: int = 0):
        start = 0
        while start < len(texts):
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.folder / f"shard-{self.shard:05d}.parquet", SCHEMA)
            n = min(len(texts) - start, self.rows_per_shard - self.rows)
            table = pa.table(
                {"codes": codes[start : start + n].flatten(1).to(torch.int16).tolist(),
                 "text": texts[start : start + n], "flipped": [flipped] * n, "crop": [crop] * n},
                schema=SCHEMA,
            )  # fmt: skip
            self.writer.write_table(table)
            start, self.rows, self.total = start + n, self.rows + n, self.total + n
            if self.rows == self.rows_per_shard:
                self.close()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer, self.rows, self.shard = None, 0, self.shard + 1


def corner_crops(pixels: torch.Tensor, size: int) -> list[torch.Tensor]:
    """The top-left, top-right, bottom-left and bottom-right `size` x `size` crops of (B, C, H, W) pixels."""
    h, w = pixels.shape[-2:]
    return [pixels[..., top : top + size, left : left + size] for top in (0, h - size) for left in (0, w - size)]


@torch.no_grad()
def extract_codes(
    tokenizer,
    tokenizer_dir: str | Path,
    source: DataSource,
    out: str | Path,
    splits: tuple[str, ...] = ("train", "test"),
    flip: bool = False,
    rows_per_shard: int = 100_000,
    batch_size: int = 256,
    crops: int = 1,
    crop_scale: float = 1.1,
) -> dict:
    """Encode every readable image of `splits` once; returns (and writes) the info record."""
    out = Path(out)
    if tokenizer.codebook_size > 2**15:
        raise ValueError(f"codebook of {tokenizer.codebook_size} codes does not fit the int16 shards")
    if crops not in CROPS:
        raise ValueError(f"crops={crops}: use 1 (the whole image) or 5 (it and four corner crops)")
    resolution = tokenizer.config.resolution
    enlarged = round(resolution * crop_scale)
    if crops > 1 and enlarged <= resolution:
        raise ValueError(f"crop_scale={crop_scale} must enlarge the {resolution}-pixel image by at least one pixel")
    counts, skipped, start = {}, {}, time.perf_counter()
    for split in splits:
        ds = load_pairs(source, split)
        ds = ds.cast_column("image", datasets.Image(decode=False))
        writer = _ShardWriter(out / split, rows_per_shard)
        bad_rows = 0
        for batch in tqdm(ds.iter(batch_size=batch_size), total=-(-len(ds) // batch_size), desc=f"extracting {split}"):
            images, bad = decode_or_skip(batch["image"])
            bad_rows += len(bad)
            if not images:
                continue
            unreadable = set(bad)
            texts = [t or "" for i, t in enumerate(batch["text"]) if i not in unreadable]
            views = [torch.stack([image_to_tensor(im, resolution, source.background) for im in images])]
            if crops > 1:
                big = torch.stack([image_to_tensor(im, enlarged, source.background) for im in images])
                views += corner_crops(big, resolution)
            for crop, pixels in enumerate(views):
                writer.write(tokenizer.encode(pixels), texts, flipped=False, crop=crop)
                if flip:
                    writer.write(tokenizer.encode(pixels.flip(-1)), texts, flipped=True, crop=crop)
        writer.close()
        counts[split], skipped[split] = writer.total, bad_rows
    seconds = time.perf_counter() - start
    images = sum(counts.values())
    info = {
        "tokenizer_digest": weights_digest(tokenizer_dir),
        "grid": list(tokenizer.grid),
        "codebook_size": tokenizer.codebook_size,
        "source": source.to_dict(),
        "rows": counts,
        "unreadable_images": skipped,
        "flip": flip,
        "crops": crops,
        "crop_scale": crop_scale if crops > 1 else None,
        "seconds": round(seconds, 2),
        "rows_per_second": round(images / max(seconds, 1e-9), 1),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def read_info(folder: str | Path) -> dict:
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no extracted codes ({INFO_FILE} missing); run `unimodal extract`")
    return json.loads(path.read_text())


def load_codes(folder: str | Path, split: str, streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    """The shards of one split as a `datasets` dataset (streaming: lazily read, one shard per file)."""
    files = sorted((Path(folder) / split).glob("shard-*.parquet"))
    if not files:
        raise ValueError(f"{folder} has no extracted codes for split {split!r}; extract it with --splits {split}")
    return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=streaming)
