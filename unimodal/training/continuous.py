"""Stage 2 with continuous image tokens (MAR): the data module that pre-encodes latents and the thin
LightningModule over `unimodal.lm.continuous`.

    unimodal continuous fit --config experiments/continuous/transformer.yaml --data.image_tokenizer DIR

The data module is the sequence data module with a vocabulary of one image id (the slot) and a second
column, `latents` (N, C) per row, from the tokenizer's deterministic encode (the posterior mean, scaled
by its latent scale). Caption dropout rewrites rows to the empty caption as for codes; the captioning
order has no continuous counterpart here and is refused.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import datasets
import lightning as L
import torch

from unimodal.data.images import image_to_tensor
from unimodal.generation.bundle import Bundle
from unimodal.lm.continuous import LatentHead, continuous_loss, slot_grid
from unimodal.lm.diffloss import DiffLossConfig
from unimodal.lm.grammar import SegmentGrammar
from unimodal.lm.transformer import TransformerConfig, build_transformer
from unimodal.lm.vocab import JointVocab
from unimodal.training.datamodules import SequenceDataModule, _report_skipped, _undecoded, decode_or_skip
from unimodal.training.modules import _adamw, _cosine, _ResumeOnThisDevice, _use_fused, checked_vocab_and_weights


class LatentSequenceDataModule(SequenceDataModule):
    """Joint sequences with slots for the image, and the latents that fill them (same arguments as the
    sequence data module; `image_tokenizer` must be continuous, `i2t_fraction` 0)."""

    latent_tokens = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # checks that the image tokenizer is continuous
        if self.i2t_fraction:
            raise ValueError("data.i2t_fraction must be 0 for continuous image tokens (no captioning order)")
        self.vocab = replace(self.vocab, image_size=1)  # one image id: the slot of a latent

    @property
    def latent_dim(self) -> int:
        """Channels of one latent (the CLI links it into the model's image head)."""
        return self.image_tokenizer.config.latent_dim

    def _row(self, text_ids: list[int], latents: torch.Tensor) -> dict:
        """One training row: the sequence with slots and its latents (N, C) as nested lists."""
        return {"input_ids": self.vocab.text_to_image_sequence(text_ids, slot_grid(self.vocab)),
                "latents": latents.flatten(0, 1).tolist()}  # fmt: skip

    def tokenize(self, ds: datasets.Dataset) -> datasets.Dataset:
        """Image-caption pairs -> `input_ids` (with slots) and `latents` (N, C). Cached."""
        resolution = self.image_tokenizer.config.resolution

        def encode(batch):
            images, bad = decode_or_skip(batch["image"])
            if not images:
                return {"input_ids": [], "latents": []}
            latents = self.image_tokenizer.encode(torch.stack([image_to_tensor(im, resolution) for im in images]))
            captions = [t for i, t in enumerate(batch["text"]) if i not in set(bad)]
            texts = self.text_tokenizer.encode_batch([c or "" for c in captions])
            rows = [self._row(t, x) for t, x in zip(texts, latents)]
            return {"input_ids": [r["input_ids"] for r in rows], "latents": [r["latents"] for r in rows]}

        out = _undecoded(ds).map(encode, batched=True, batch_size=self.encode_batch_size,
                                 remove_columns=ds.column_names, new_fingerprint=self._fingerprint(ds) + "-latents",
                                 desc="encoding latents")  # fmt: skip
        _report_skipped("encoded", len(ds), len(out))
        return out

    def _collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = super()._collate(rows)
        batch["latents"] = torch.stack([torch.as_tensor(r["latents"], dtype=torch.float32) for r in rows])
        return batch  # input_ids, attention_mask (B, T), latents (B, N, C)

    def _stream_item(self, row: dict) -> dict | None:
        images, _ = decode_or_skip([row["image"]])
        if not images:
            return None
        x = image_to_tensor(images[0], self.image_tokenizer.config.resolution)[None]
        return self._row(self.text_tokenizer.encode(row["text"] or ""), self.image_tokenizer.encode(x)[0])

    def mix(self, batch: dict[str, torch.Tensor], batch_index: int) -> dict[str, torch.Tensor]:
        """Caption dropout: some rows get the empty caption, seeded by (mix_seed, batch_index) as for codes."""
        if not self.caption_dropout:
            return batch
        g = torch.Generator().manual_seed(self.mix_seed * 1_000_003 + batch_index)
        drop = torch.rand(batch["input_ids"].shape[0], generator=g) < self.caption_dropout
        rows = []
        for ids, mask, latents, to_null in zip(batch["input_ids"], batch["attention_mask"], batch["latents"], drop):
            text, _ = self.vocab.split_sequence(ids[mask.bool()].tolist())
            rows.append({"input_ids": self.vocab.text_to_image_sequence([] if to_null else text,
                                                                        slot_grid(self.vocab)),
                         "latents": latents})  # fmt: skip
        return self._collate(rows)

    def image_unigram_loss(self) -> float | None:
        return None  # no codes: the unigram baseline of the image loss does not exist


class ContinuousTransformerModule(_ResumeOnThisDevice, L.LightningModule):
    """Stage 2 over continuous image tokens: the transformer and its image head (`lm.continuous`).

    Args:
        vocab: the joint vocabulary with one image id (linked from the data module).
        model: transformer size.
        head: the diffusion head (token_dim and cond_dim are set from the tokenizer and the transformer).
        image_tokenizer_dim: channels of one latent (linked from the data module's tokenizer).
        lr: peak learning rate (cosine decay after warm-up).
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW decay on weight matrices.
        loss_weights: weights of the text cross-entropy and the image diffusion loss (text 1 : image 20 by
            default: the diffusion loss is about a tenth of the text loss, and at 1 : 1 the backbone
            barely learned to read the caption for the image; docs/continuous.md).
        grammar_loss_mask: restrict each position's softmax to the ids the grammar allows there.
    """

    def __init__(
        self,
        vocab: JointVocab | None = None,
        model: TransformerConfig = TransformerConfig(),  # noqa: B008
        head: DiffLossConfig = DiffLossConfig(),  # noqa: B008
        image_tokenizer_dim: int = 16,
        lr: float = 1e-3,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        loss_weights: dict[str, float] | None = None,
        grammar_loss_mask: bool = True,
    ):
        super().__init__()
        vocab, loss_weights = checked_vocab_and_weights(self, vocab, loss_weights, {"text": 1.0, "image": 20.0})
        head = replace(head, token_dim=image_tokenizer_dim, cond_dim=model.d_model)
        self.save_hyperparameters({"vocab": vocab.to_dict(), "model": asdict(model), "head": asdict(head),
                                   "image_tokenizer_dim": image_tokenizer_dim, "lr": lr, "warmup_steps": warmup_steps,
                                   "weight_decay": weight_decay, "loss_weights": loss_weights,
                                   "grammar_loss_mask": grammar_loss_mask})  # fmt: skip
        self.vocab, self.grammar, self.loss_weights = vocab, SegmentGrammar(vocab), loss_weights
        self.model = build_transformer(model, vocab)
        self.image_head = LatentHead(head)

    def _loss(self, batch):
        return continuous_loss(self.model, self.image_head, self.vocab, self.grammar, batch, self.loss_weights,
                               self.hparams.grammar_loss_mask)  # fmt: skip

    def training_step(self, batch, batch_idx):
        loss, parts = self._loss(batch)
        self.log_dict({"train/loss": loss, "train/loss_text": parts["text"], "train/loss_image": parts["image"]},
                      prog_bar=True)  # fmt: skip
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        loss, parts = self._loss(batch)
        extra = getattr(self.trainer.datamodule, "extra_val_splits", [])
        prefix = "val/" if dataloader_idx == 0 else f"val_{extra[dataloader_idx - 1]}/"
        metrics = {"loss": loss, "loss_text": parts["text"], "loss_image": parts["image"]}
        self.log_dict({prefix + k: v for k, v in metrics.items()}, batch_size=batch["input_ids"].shape[0],
                      add_dataloader_idx=False, prog_bar=True)  # fmt: skip

    def configure_optimizers(self):
        opt = _adamw(self, self.hparams.lr, self.hparams.weight_decay, _use_fused(self.trainer))
        return _cosine(opt, self.trainer, self.hparams.warmup_steps)

    def bundle(self, datamodule) -> Bundle:
        return Bundle(datamodule.text_tokenizer, datamodule.image_tokenizer, self.vocab, self.model,
                      datamodule.source.to_dict(), self.image_head)  # fmt: skip

    def export(self, directory: Path, datamodule) -> Path:
        return self.bundle(datamodule).save(directory)
