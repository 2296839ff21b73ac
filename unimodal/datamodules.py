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
from torch.utils.data import DataLoader

from .data import DataSource, image_to_tensor, load_pairs
from .image_tokenizer import WEIGHTS_FILE, ImageTokenizer, load_config
from .text_tokenizer import TOKENIZER_FILE, TextTokenizer
from .vocab import JointVocab

log = logging.getLogger(__name__)


def _loader(ds, batch_size: int, shuffle: bool, num_workers: int, collate_fn=None) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
        drop_last=shuffle,
    )


class ImageDataModule(L.LightningDataModule):
    """Images only, for the image tokenizer.

    Args:
        source: where the image-caption pairs come from (built-in shapes by default).
        resolution: side of the square images the tokenizer sees.
        batch_size: images per step.
        num_workers: DataLoader worker processes (0 = in the main process).
        val_split: split used for validation metrics (over the whole split).
        max_val_images: cap on validation images (None = all).
    """

    def __init__(
        self,
        source: DataSource = DataSource(),  # noqa: B008
        resolution: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        val_split: str = "test",
        max_val_images: int | None = None,
    ):
        super().__init__()
        self.source = source
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_split = val_split
        self.max_val_images = max_val_images

    def _images(self, split: str, limit: int | None = None) -> datasets.Dataset:
        """Decode, convert and resize once (cached by `datasets`), then serve uint8 tensors."""
        ds = load_pairs(self.source, split).select_columns(["image"])
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        res = self.resolution

        def to_pixels(batch):
            pixels = torch.stack([image_to_tensor(im, res) for im in batch["image"]])
            return {"pixels": pixels.add(1).mul(127.5).round().to(torch.uint8).numpy()}

        features = datasets.Features({"pixels": datasets.Array3D((3, res, res), "uint8")})
        ds = ds.map(to_pixels, batched=True, remove_columns=["image"], features=features, desc=f"decoding {split}")
        return ds.with_format("torch")

    def setup(self, stage: str | None = None):
        self.train_set = self._images("train")
        self.val_set = self._images(self.val_split, self.max_val_images)

    @staticmethod
    def _collate(rows: list[dict]) -> torch.Tensor:
        """uint8 (B, 3, R, R) -> float in [-1, 1]."""
        return torch.stack([r["pixels"] for r in rows]).float().div(127.5).sub(1.0)

    def train_dataloader(self):
        return _loader(self.train_set, self.batch_size, True, self.num_workers, self._collate)

    def val_dataloader(self):
        return _loader(self.val_set, self.batch_size, False, self.num_workers, self._collate)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class SequenceDataModule(L.LightningDataModule):
    """Pre-tokenized joint sequences for the transformer.

    Args:
        image_tokenizer: folder of a trained image tokenizer (stage 1's export).
        text_tokenizer: folder for `tokenizer.json`; trained on the train captions if missing.
        source: where the image-caption pairs come from.
        text_vocab_size: BPE vocabulary size when training the text tokenizer.
        max_text_tokens: text budget per caption; longer captions are truncated with a warning.
        batch_size: sequences per step.
        num_workers: DataLoader worker processes.
        val_split: split for validation losses.
        max_val_samples: cap on validation sequences (None = all).
        encode_batch_size: images per image-tokenizer call while pre-tokenizing.
        caption_dropout: probability that a training text-to-image row gets the empty caption
            (`<bos> <boi> codes <eoi> <eos>`), which classifier-free guidance needs (0 = off).
        i2t_fraction: probability that a training row is rewritten in the captioning order
            `<bos> <boi> codes <eoi> text <eos>` (0 = text-to-image only; > 0 puts `image_to_text`
            in the vocabulary so the grammar allows it).
        mix_seed: seed of the per-batch choices above; they depend only on (mix_seed, batch index),
            so a resumed run makes the same choices.
    """

    def __init__(
        self,
        image_tokenizer: str,
        text_tokenizer: str,
        source: DataSource = DataSource(),  # noqa: B008
        text_vocab_size: int = 1024,
        max_text_tokens: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        val_split: str = "test",
        max_val_samples: int | None = None,
        encode_batch_size: int = 256,
        caption_dropout: float = 0.0,
        i2t_fraction: float = 0.0,
        mix_seed: int = 0,
    ):
        super().__init__()
        for name, value in (("caption_dropout", caption_dropout), ("i2t_fraction", i2t_fraction)):
            if not 0 <= value < 1:
                raise ValueError(f"data.{name} must be in [0, 1), got {value}")
        self.caption_dropout, self.i2t_fraction, self.mix_seed = caption_dropout, i2t_fraction, mix_seed
        self.source = source
        self.image_tokenizer_dir = Path(image_tokenizer)
        self.text_tokenizer_dir = Path(text_tokenizer)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_split = val_split
        self.max_val_samples = max_val_samples
        self.encode_batch_size = encode_batch_size
        # The vocabulary must exist before the model is built (the CLI links it into the model).
        self.image_tokenizer = ImageTokenizer.from_pretrained(self.image_tokenizer_dir)
        self.text_tokenizer = self._text_tokenizer(text_vocab_size)
        image_config = load_config(self.image_tokenizer_dir)
        self.vocab = JointVocab(
            text_size=self.text_tokenizer.vocab_size,
            image_size=image_config.codebook_size,
            image_grid=(image_config.grid_size, image_config.grid_size),
            max_text_tokens=max_text_tokens,
            image_to_text=i2t_fraction > 0,
        )

    def _text_tokenizer(self, vocab_size: int) -> TextTokenizer:
        if (self.text_tokenizer_dir / TOKENIZER_FILE).is_file():
            return TextTokenizer.load(self.text_tokenizer_dir)
        captions = load_pairs(self.source, "train")["text"]
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
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def tokenize(self, ds: datasets.Dataset) -> datasets.Dataset:
        """Image-caption pairs -> a dataset with one column, `input_ids` (joint ids). Cached."""
        vocab, resolution = self.vocab, self.image_tokenizer.config.resolution

        def encode(batch):
            pixels = torch.stack([image_to_tensor(im, resolution) for im in batch["image"]])
            codes = self.image_tokenizer.encode(pixels)  # (B, h, w)
            texts = self.text_tokenizer.encode_batch(batch["text"])
            return {"input_ids": [vocab.text_to_image_sequence(t, c) for t, c in zip(texts, codes)]}

        too_long = sum(len(t) > vocab.max_text_tokens for t in self.text_tokenizer.encode_batch(ds["text"]))
        if too_long:
            log.warning(
                "%d of %d captions exceed max_text_tokens=%d and are truncated; raise data.max_text_tokens "
                "to keep them whole.", too_long, len(ds), vocab.max_text_tokens,
            )  # fmt: skip
        return ds.map(
            encode,
            batched=True,
            batch_size=self.encode_batch_size,
            remove_columns=ds.column_names,
            new_fingerprint=self._fingerprint(ds),
            desc="pre-tokenizing",
        )

    def setup(self, stage: str | None = None):
        self.image_tokenizer.eval()
        self.train_set = self.tokenize(load_pairs(self.source, "train"))
        val = load_pairs(self.source, self.val_split)
        if self.max_val_samples is not None:
            val = val.select(range(min(self.max_val_samples, len(val))))
        self.val_set = self.tokenize(val)

    def _collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest sequence in the batch: input_ids and attention_mask (B, T)."""
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.vocab.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask}

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
            codes = torch.tensor(codes).view(*v.image_grid)
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

    def train_dataloader(self):
        return _loader(self.train_set, self.batch_size, True, self.num_workers, self._collate)

    def val_dataloader(self):
        return _loader(self.val_set, self.batch_size, False, self.num_workers, self._collate)

    def image_unigram_loss(self) -> float:
        """Cross-entropy (nats) of the val image codes under the train codes' unigram distribution:
        the baseline `val/loss_image` must beat."""
        k, off = self.vocab.image_size, self.vocab.image_offset

        def histogram(ds):
            ids = torch.tensor([i for row in ds["input_ids"] for i in row])
            codes = ids[self.vocab.is_image(ids)] - off
            return torch.bincount(codes, minlength=k).double()

        train, val = histogram(self.train_set), histogram(self.val_set)
        p = (train + 1) / (train.sum() + k)  # add-one smoothing: unseen codes are not infinitely surprising
        return float(-(val * p.log()).sum() / val.sum())
