"""Lightning DataModules for the two stages.

Stage 1 (`ImageDataModule`): images -> (B, 3, R, R) tensors.
Stage 2 (`SequenceDataModule`): trains (or loads) the BPE text tokenizer, builds the joint
vocabulary from it and the stage-1 image tokenizer, and pre-tokenizes every pair once into
`<bos> text <boi> codes <eoi> <eos>` with `datasets.map` (cached by a fingerprint of the data
and both tokenizers, so a second run starts at once).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import datasets
import lightning as L
import torch

from unimodal.data.codes import load_codes, read_info, weights_digest
from unimodal.data.images import decode_or_skip, image_to_tensor, image_to_uint8, uint8_to_float
from unimodal.data.order import ResumableData
from unimodal.data.pairs import DataSource, load_pairs
from unimodal.lm.vocab import JointVocab, right_pad
from unimodal.tokenizers.image import WEIGHTS_FILE, ImageTokenizer, load_config
from unimodal.tokenizers.text import TOKENIZER_FILE, TextTokenizer

log = logging.getLogger(__name__)


class ImageDataModule(ResumableData, L.LightningDataModule):
    """Images only, for the image tokenizer.

    Args:
        source: where the image-caption pairs come from (built-in shapes by default).
        resolution: side of the square images the tokenizer sees.
        batch_size: images per step.
        num_workers: DataLoader worker processes (0 = in the main process).
        pin_memory: page-locked batches for faster host-to-GPU copies (None = when CUDA is present).
        val_split: split used for validation metrics (over the whole split).
        max_val_images: cap on validation images (None = all).
        seed: seed of the training order (one permutation per epoch; exact on resume and across processes).
        streaming: read the training split as a `datasets` IterableDataset, sharded per process
            (`split_dataset_by_node`), decoded on the fly, shuffled through a buffer; needs trainer.max_steps.
        in_memory_bytes: splits whose decoded uint8 pixels fit in this many bytes are served from one
            in-memory tensor; larger ones from the `datasets` cache on disk.
    """

    def __init__(
        self,
        source: DataSource = DataSource(),  # noqa: B008
        resolution: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        val_split: str = "test",
        max_val_images: int | None = None,
        seed: int = 0,
        streaming: bool = False,
        in_memory_bytes: int = 2 * 1024**3,
    ):
        super().__init__()
        self.seed, self.streaming, self.in_memory_bytes = seed, streaming, in_memory_bytes
        self.source = source
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.val_split = val_split
        self.max_val_images = max_val_images

    def _images(self, split: str, limit: int | None = None) -> datasets.Dataset:
        """Decode, convert and resize once (cached by `datasets`), then serve uint8 tensors."""
        ds = _undecoded(load_pairs(self.source, split).select_columns(["image"]))
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        res, background = self.resolution, self.source.background

        def to_pixels(batch):
            images, _ = decode_or_skip(batch["image"])  # unreadable rows are dropped (and counted below)
            pixels = [image_to_uint8(im, res, background) for im in images]
            return {
                "pixels": (torch.stack(pixels) if pixels else torch.zeros(0, 3, res, res, dtype=torch.uint8)).numpy()
            }

        features = datasets.Features({"pixels": datasets.Array3D((3, res, res), "uint8")})
        out = ds.map(to_pixels, batched=True, remove_columns=["image"], features=features, desc=f"decoding {split}")
        _report_skipped(split, len(ds), len(out))
        if len(out) * 3 * res * res <= self.in_memory_bytes:  # small enough: one uint8 tensor, fastest to serve
            return _PixelTensor(torch.from_numpy(out.with_format("numpy")[:]["pixels"]))
        return out.with_format("torch")

    def setup(self, stage: str | None = None):
        if self.streaming:
            self.train_stream = _undecoded(load_pairs(self.source, "train").select_columns(["image"]))
        else:
            self.train_set = self._images("train")
        self.val_set = self._images(self.val_split, self.max_val_images)

    def _stream_item(self, row: dict) -> dict | None:
        images, _ = decode_or_skip([row["image"]])
        if not images:
            return None
        return {"pixels": image_to_uint8(images[0], self.resolution, self.source.background)}

    @staticmethod
    def _collate(rows: list[dict]) -> torch.Tensor:
        """uint8 (B, 3, R, R) -> float in [-1, 1]."""
        return uint8_to_float(torch.stack([r["pixels"] for r in rows]))


class _PixelTensor(torch.utils.data.Dataset):
    """Pre-decoded uint8 images (N, 3, R, R) held in memory; rows look like the `datasets` rows."""

    def __init__(self, pixels: torch.Tensor):
        self.pixels = pixels

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"pixels": self.pixels[i]}


def _undecoded(ds: datasets.Dataset) -> datasets.Dataset:
    """Images as raw {"bytes", "path"} so that one corrupt file is a skipped row, not a crashed run."""
    return ds.cast_column("image", datasets.Image(decode=False))


def _report_skipped(split: str, before: int, after: int):
    if after == 0:
        raise ValueError(f"no readable images in split {split!r} ({before} rows): check data.source")
    if after < before:
        log.warning("split %r: skipped %d of %d rows with unreadable images", split, before - after, before)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class SequenceDataModule(ResumableData, L.LightningDataModule):
    """Pre-tokenized joint sequences for the transformer.

    Args:
        image_tokenizer: folder of a trained image tokenizer (stage 1's export).
        text_tokenizer: folder for `tokenizer.json`; trained on the train captions if missing.
        source: where the image-caption pairs come from.
        text_vocab_size: BPE vocabulary size when training the text tokenizer.
        max_text_tokens: text budget per caption; longer captions are truncated with a warning.
        batch_size: sequences per step.
        num_workers: DataLoader worker processes.
        pin_memory: page-locked batches for faster host-to-GPU copies (None = when CUDA is present).
        val_split: split for validation losses.
        extra_val_splits: more splits validated alongside it, logged as `val_{split}/...` (e.g. the
            shapes `heldout` split: the teacher-forced loss on unseen colour-shape compositions).
        max_val_samples: cap on validation sequences per split (None = all).
        encode_batch_size: images per image-tokenizer call while pre-tokenizing.
        seed: seed of the training order (one permutation per epoch; exact on resume and across processes).
        streaming: read the training split as a `datasets` IterableDataset, sharded per process,
            tokenized on the fly (no pre-tokenized cache); needs trainer.max_steps.
        codes: folder written by `unimodal extract` with this image tokenizer: image codes are read from
            its Parquet shards (streamed with `streaming`) instead of encoding images; splits it lacks
            are encoded from `source` as usual.
        mark_crops: with `codes` extracted with `--crops 5`, corner-crop rows train on the caption
            prefixed "crop N, " (N = 1-4): the model learns from the crops and draws the whole image for a
            plain caption (conditioning on the augmentation, as EDM does, to keep the crops out of the
            samples). Off: crop rows train on the plain caption.
        caption_dropout: probability that a training text-to-image row gets the empty caption
            (`<bos> <boi> codes <eoi> <eos>`), which classifier-free guidance needs (0 = off).
        i2t_fraction: probability that a training row is rewritten in the captioning order
            `<bos> <boi> codes <eoi> text <eos>` (0 = text-to-image only; > 0 puts `image_to_text`
            in the vocabulary so the grammar allows it).
        mix_seed: seed of the per-batch choices above; they depend only on (mix_seed, batch index),
            so a resumed run makes the same choices.
    """

    latent_tokens = False  # the image segment as continuous vectors (LatentSequenceDataModule)

    def __init__(
        self,
        image_tokenizer: str,
        text_tokenizer: str,
        source: DataSource = DataSource(),  # noqa: B008
        text_vocab_size: int = 1024,
        max_text_tokens: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        val_split: str = "test",
        extra_val_splits: list[str] | None = None,
        max_val_samples: int | None = None,
        encode_batch_size: int = 256,
        caption_dropout: float = 0.0,
        i2t_fraction: float = 0.0,
        mix_seed: int = 0,
        seed: int = 0,
        streaming: bool = False,
        codes: str | None = None,
        mark_crops: bool = False,
    ):
        super().__init__()
        self.seed, self.streaming = seed, streaming
        self.codes, self.mark_crops = codes, mark_crops
        info = read_info(codes) if codes is not None else {}
        if codes is not None:
            recorded, actual = info["tokenizer_digest"], weights_digest(image_tokenizer)
            if recorded != actual:
                raise ValueError(
                    f"the codes in {codes} were extracted with another image tokenizer (weights {recorded}, "
                    f"{image_tokenizer} has {actual}); extract them again with this one"
                )
        if mark_crops and info.get("crops", 1) == 1:
            raise ValueError(
                "data.mark_crops needs data.codes extracted with corner crops (unimodal extract --crops 5)"
            )
        for name, value in (("caption_dropout", caption_dropout), ("i2t_fraction", i2t_fraction)):
            if not 0 <= value < 1:
                raise ValueError(f"data.{name} must be in [0, 1), got {value}")
        self.caption_dropout, self.i2t_fraction, self.mix_seed = caption_dropout, i2t_fraction, mix_seed
        self.source = source
        self.image_tokenizer_dir = Path(image_tokenizer)
        self.text_tokenizer_dir = Path(text_tokenizer)
        self.batch_size = batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.val_split = val_split
        self.extra_val_splits = list(extra_val_splits or [])
        if val_split in self.extra_val_splits:
            raise ValueError(f"data.extra_val_splits repeats data.val_split {val_split!r}; list other splits")
        self.max_val_samples = max_val_samples
        self.encode_batch_size = encode_batch_size
        # The vocabulary must exist before the model is built (the CLI links it into the model).
        self.image_tokenizer = ImageTokenizer.from_pretrained(self.image_tokenizer_dir)
        quantizer = self.image_tokenizer.config.quantizer
        if self.image_tokenizer.continuous and not self.latent_tokens:
            raise ValueError(
                f"{self.image_tokenizer_dir} is a continuous image tokenizer (quantizer {quantizer!r}): its tokens "
                "are vectors, not codes; train stage 2 on it with `unimodal continuous fit`"
            )
        if self.latent_tokens and not self.image_tokenizer.continuous:
            raise ValueError(
                f"{self.image_tokenizer_dir} has quantizer {quantizer!r}; continuous stage 2 needs a continuous "
                "tokenizer (model.model.quantizer: kl in stage 1)"
            )
        self.text_tokenizer = self._text_tokenizer(text_vocab_size)
        image_config = load_config(self.image_tokenizer_dir)
        self.vocab = JointVocab(
            text_size=self.text_tokenizer.vocab_size,
            image_size=image_config.codebook_size,
            image_grid=(image_config.grid_size, image_config.grid_size),
            max_text_tokens=max_text_tokens,
            image_to_text=i2t_fraction > 0,
            image_scales=self.image_tokenizer.scales,  # a multi-scale tokenizer's codes: next-scale prediction
        )

    def _text_tokenizer(self, vocab_size: int) -> TextTokenizer:
        if (self.text_tokenizer_dir / TOKENIZER_FILE).is_file():
            return TextTokenizer.load(self.text_tokenizer_dir)
        pairs = load_codes(self.codes, "train") if self.codes else load_pairs(self.source, "train")
        captions = [t for t in pairs["text"] if t]
        if not captions:
            raise ValueError(f"the train split of {self.source.name!r} has no captions to train the text tokenizer on")
        tokenizer = TextTokenizer.train(captions, vocab_size=vocab_size)
        tokenizer.save(self.text_tokenizer_dir)
        log.info("trained text tokenizer (%d ids) -> %s", tokenizer.vocab_size, self.text_tokenizer_dir)
        return tokenizer

    def _fingerprint(self, ds: datasets.Dataset) -> str:
        parts = [
            ds._fingerprint,
            _file_digest(self.image_tokenizer_dir / WEIGHTS_FILE),
            _file_digest(self.text_tokenizer_dir / TOKENIZER_FILE),
            str(sorted(self.vocab.to_dict().items())),
            self.source.background,
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def tokenize(self, ds: datasets.Dataset) -> datasets.Dataset:
        """Image-caption pairs -> a dataset with one column, `input_ids` (joint ids). Cached."""
        vocab, resolution = self.vocab, self.image_tokenizer.config.resolution

        def encode(batch):
            images, bad = decode_or_skip(batch["image"])  # unreadable rows are dropped (and counted below)
            if not images:
                return {"input_ids": []}
            pixels = torch.stack([image_to_tensor(im, resolution, self.source.background) for im in images])
            codes = self.image_tokenizer.encode(pixels)  # (B, h, w)
            skipped = set(bad)
            captions = [t for i, t in enumerate(batch["text"]) if i not in skipped]
            texts = self.text_tokenizer.encode_batch([c or "" for c in captions])
            return {"input_ids": [vocab.text_to_image_sequence(t, c) for t, c in zip(texts, codes)]}

        texts = [t or "" for t in ds["text"]]
        too_long = sum(len(t) > vocab.max_text_tokens for t in self.text_tokenizer.encode_batch(texts))
        if too_long:
            log.warning(
                "%d of %d captions exceed max_text_tokens=%d and are truncated; raise data.max_text_tokens "
                "to keep them whole.", too_long, len(ds), vocab.max_text_tokens,
            )  # fmt: skip
        empty = sum(not t.strip() for t in texts)
        if empty:
            log.warning("%d of %d captions are empty; they train the unconditional (null-caption) case", empty, len(ds))
        out = _undecoded(ds).map(
            encode,
            batched=True,
            batch_size=self.encode_batch_size,
            remove_columns=ds.column_names,
            new_fingerprint=self._fingerprint(ds),
            desc="pre-tokenizing",
        )
        _report_skipped("pre-tokenized", len(ds), len(out))
        return out

    def tokenize_codes(self, ds: datasets.Dataset) -> datasets.Dataset:
        """Extracted code rows (codes, text) -> `input_ids`, as `tokenize` does for images. Cached."""
        vocab, shape = self.vocab, self.vocab.codes_shape

        def encode(batch):
            codes = torch.tensor(batch["codes"], dtype=torch.long).view(-1, *shape)
            crops = batch.get("crop") or [0] * len(codes)
            texts = self.text_tokenizer.encode_batch([self._code_caption(t, c) for t, c in zip(batch["text"], crops)])
            return {"input_ids": [vocab.text_to_image_sequence(t, c) for t, c in zip(texts, codes)]}

        return ds.map(encode, batched=True, batch_size=1024, remove_columns=ds.column_names,
                      new_fingerprint=self._fingerprint(ds) + ("-marked" if self.mark_crops else ""),
                      desc="tokenizing extracted codes")  # fmt: skip

    def _code_caption(self, text: str | None, crop: int) -> str:
        """The caption a row of extracted codes trains on (see `mark_crops`)."""
        text = text or ""
        return f"crop {crop}, {text}" if self.mark_crops and crop else text

    def _has_codes(self, split: str) -> bool:
        return self.codes is not None and split in read_info(self.codes)["rows"]

    def setup(self, stage: str | None = None):
        self.image_tokenizer.eval()
        if self.streaming and self._has_codes("train"):
            self.train_stream = load_codes(self.codes, "train", streaming=True)
        elif self.streaming:
            self.train_stream = _undecoded(load_pairs(self.source, "train").select_columns(["image", "text"]))
        elif self._has_codes("train"):
            self.train_set = self.tokenize_codes(load_codes(self.codes, "train"))
        else:
            self.train_set = self.tokenize(load_pairs(self.source, "train"))
        self.val_set = self._val_split(self.val_split)
        self.extra_val_sets = {split: self._val_split(split) for split in self.extra_val_splits}

    def _val_split(self, split: str) -> datasets.Dataset:
        if self._has_codes(split):
            val = load_codes(self.codes, split)
            if self.max_val_samples is not None:
                val = val.select(range(min(self.max_val_samples, len(val))))
            return self.tokenize_codes(val)
        val = load_pairs(self.source, split)
        if self.max_val_samples is not None:
            val = val.select(range(min(self.max_val_samples, len(val))))
        return self.tokenize(val)

    def _collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest sequence in the batch: input_ids and attention_mask (B, T)."""
        ids, mask = right_pad([r["input_ids"] for r in rows], self.vocab.pad)
        return {"input_ids": ids, "attention_mask": mask}

    def _stream_item(self, row: dict) -> dict | None:
        if "codes" in row:  # a row of extracted codes
            codes = torch.tensor(row["codes"], dtype=torch.long).view(self.vocab.codes_shape)
            text = self._code_caption(row["text"], row.get("crop") or 0)
            return {"input_ids": self.vocab.text_to_image_sequence(self.text_tokenizer.encode(text), codes)}
        images, _ = decode_or_skip([row["image"]])
        if not images:
            return None
        resolution = self.image_tokenizer.config.resolution
        pixels = image_to_tensor(images[0], resolution, self.source.background)[None]
        codes = self.image_tokenizer.encode(pixels)[0]  # (h, w)
        return {"input_ids": self.vocab.text_to_image_sequence(self.text_tokenizer.encode(row["text"] or ""), codes)}

    def mix(self, batch: dict[str, torch.Tensor], batch_index: int) -> dict[str, torch.Tensor]:
        """Rewrite some rows of a collated training batch: captioning order (i2t_fraction), then the
        empty caption (caption_dropout) among the rest. The choices come from a generator seeded
        by (mix_seed, batch_index) only, so they do not depend on worker processes or resumption."""
        if not (self.caption_dropout or self.i2t_fraction):
            return batch
        v = self.vocab
        g = torch.Generator().manual_seed(self.mix_seed * 1_000_003 + batch_index)
        u = torch.rand(batch["input_ids"].shape[0], generator=g)  # one draw per row decides its order
        i2t = u < self.i2t_fraction
        drop = (u >= self.i2t_fraction) & (u < self.i2t_fraction + (1 - self.i2t_fraction) * self.caption_dropout)
        rows = []
        for ids, mask, to_i2t, to_null in zip(batch["input_ids"], batch["attention_mask"], i2t, drop):
            text, codes = v.split_sequence(ids[mask.bool()].tolist())
            codes = torch.tensor(codes).view(*v.codes_shape)
            if to_i2t:
                rows.append({"input_ids": v.image_to_text_sequence(text, codes)})
            else:
                rows.append({"input_ids": v.text_to_image_sequence([] if to_null else text, codes)})
        return self._collate(rows)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Training batches only: `mix` them, keyed by the loop's batch counter (restored on resume)."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return batch
        return self.mix(batch, trainer.fit_loop.epoch_loop.batch_progress.total.ready)

    def image_unigram_loss(self) -> float | None:
        """Cross-entropy (nats) of the val image codes under the train codes' unigram distribution:
        the baseline `val/loss_image` must beat (None when streaming: no pass over the train split)."""
        if self.streaming:
            return None
        k, off = self.vocab.image_size, self.vocab.image_offset

        def histogram(ds):
            ids = torch.tensor([i for row in ds["input_ids"] for i in row])
            codes = ids[self.vocab.is_image(ids)] - off
            return torch.bincount(codes, minlength=k).double()

        train, val = histogram(self.train_set), histogram(self.val_set)
        p = (train + 1) / (train.sum() + k)  # add-one smoothing: unseen codes are not infinitely surprising
        return float(-(val * p.log()).sum() / val.sum())
