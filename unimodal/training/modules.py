"""Thin LightningModules over the plain models: steps, optimizers, metrics, logging.

The math lives in `image_tokenizer`, `model` and `grammar`; here are only steps, optimizers,
metrics and logging. Metric keys: `train/...`, `val/...`.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

from unimodal.generation.bundle import Bundle
from unimodal.lm import next_scale
from unimodal.lm.grammar import SegmentGrammar
from unimodal.lm.transformer import TransformerConfig, build_transformer, sequence_loss
from unimodal.lm.vocab import JointVocab
from unimodal.tokenizers.image import ImageTokenizer, ImageTokenizerConfig, psnr, ssim
from unimodal.tokenizers.losses import PatchDiscriminator, adaptive_weight, generator_adv_loss, hinge_d_loss
from unimodal.tokenizers.multiscale import scale_counts, scale_usage, warn_low_usage
from unimodal.tokenizers.quantizers import code_statistics
from unimodal.training.loggers import log_image
from unimodal.viz import make_grid, usage_histogram


def _use_fused(trainer) -> bool:
    """The fused AdamW kernel on GPUs (on the 2-core CPUs measured it ran at 0.99x the default: `bench
    train`), except under fp16 mixed precision, where Lightning's gradient clipping refuses it."""
    return trainer.strategy.root_device.type == "cuda" and str(trainer.precision) != "16-mixed"


def ignore_library_deprecations():
    """Filters (inside the caller's `warnings.catch_warnings()`) the warnings that Lightning's own calls
    into torch raise and that no user can act on: its use of a torch pytree API newer torch deprecates."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def _adamw(module: torch.nn.Module, lr: float, weight_decay: float, fused: bool, betas=(0.9, 0.95)):
    """AdamW with decay on matrices only (not norms, biases, or the VQ codebook's usage buffers)."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


class _ResumeOnThisDevice:
    """A resumed run uses the fused kernel if *this* run would (torch restores each optimizer group's
    settings from the checkpoint, so a CPU run resumed on a GPU would stay unfused, and a GPU run
    resumed under fp16 would stay fused and fail at gradient clipping)."""

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is None:  # load_from_checkpoint: no optimizer to restore
            return
        fused = _use_fused(self.trainer) or None
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                if "fused" in group:
                    group["fused"] = fused


def _cosine(optimizer, trainer, warmup_steps: int):
    total = max(int(trainer.estimated_stepping_batches), warmup_steps + 1)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class TokenizerModule(_ResumeOnThisDevice, L.LightningModule):
    """Stage 1: the image tokenizer (any quantizer in `unimodal.quantizers`).

    Loss: pixel (MSE or L1) + the quantizer's own terms (+ optionally a PatchGAN hinge term,
    VQGAN-style: from `adversarial_start` on, weighted by `adversarial_weight` times the adaptive
    ratio of reconstruction to adversarial gradients at the decoder's last layer).

    Args:
        model: the image tokenizer's architecture and quantizer.
        lr: peak learning rate (cosine decay after warm-up).
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW decay on weight matrices.
        pixel_loss: "mse" or "l1".
        adversarial_weight: weight of the PatchGAN term (0 = off).
        adversarial_start: step at which the discriminator and its loss switch on.
        disc_channels: width of the PatchGAN discriminator's first layer.
        scale_usage_warning: multiscale quantizer: warn when a scale's validation usage falls under
            this fraction of the codes it could reach (min(K, positions at that scale)).
    """

    def __init__(
        self,
        model: ImageTokenizerConfig = ImageTokenizerConfig(),  # noqa: B008 (immutable in practice; CLI needs it)
        lr: float = 2e-3,
        warmup_steps: int = 50,
        weight_decay: float = 0.0,
        pixel_loss: str = "mse",
        adversarial_weight: float = 0.0,
        adversarial_start: int = 1000,
        disc_channels: int = 32,
        scale_usage_warning: float = 0.05,
    ):
        super().__init__()
        if pixel_loss not in ("mse", "l1"):
            raise ValueError(f"pixel_loss must be 'mse' or 'l1', got {pixel_loss!r}")
        if adversarial_weight < 0 or adversarial_start < 0:
            raise ValueError("adversarial_weight and adversarial_start must be >= 0")
        self.save_hyperparameters({"model": asdict(model), "lr": lr, "warmup_steps": warmup_steps,
                                   "weight_decay": weight_decay, "pixel_loss": pixel_loss,
                                   "adversarial_weight": adversarial_weight, "adversarial_start": adversarial_start,
                                   "disc_channels": disc_channels,
                                   "scale_usage_warning": scale_usage_warning})  # fmt: skip
        self.tokenizer = ImageTokenizer(model)
        self.pixel_loss = F.mse_loss if pixel_loss == "mse" else F.l1_loss
        self.discriminator = PatchDiscriminator(disc_channels) if adversarial_weight > 0 else None

    def training_step(self, images, batch_idx):
        self.tokenizer.quantizer.set_step(self.global_step)
        recon, q = self.tokenizer(images)
        rec = self.pixel_loss(recon, images)
        loss = rec + q.loss
        logs = {"train/loss": loss, "train/rec_loss": rec, "train/vq_loss": q.loss}
        if self.discriminator is not None and self.global_step >= self.hparams.adversarial_start:
            # One optimizer step trains both: the generator term cannot move the discriminator
            # (frozen copy of its weights), the discriminator term sees only detached reconstructions.
            g_adv = generator_adv_loss(self.discriminator, recon)
            last_layer = self.tokenizer.decoder.net[-1].weight
            weight = self.hparams.adversarial_weight * adaptive_weight(rec, g_adv, last_layer)
            d_loss = hinge_d_loss(self.discriminator(images), self.discriminator(recon.detach()))
            loss = loss + weight * g_adv + d_loss
            logs.update({"train/loss": loss, "train/g_adv": g_adv, "train/adv_weight": weight, "train/d_loss": d_loss})
        self.log_dict(logs, prog_bar=True)
        self.log_dict({f"train/{k}": float(v) for k, v in q.stats.items()})
        return loss

    def on_validation_epoch_start(self):
        k = self.tokenizer.codebook_size
        self._val = {"psnr": 0.0, "ssim": 0.0, "n": 0, "rec": 0.0, "kl": 0.0,
                     "counts": torch.zeros(k, dtype=torch.long)}  # fmt: skip
        if self.tokenizer.scales is not None:
            self._val["scale_counts"] = torch.zeros(len(self.tokenizer.scales), k, dtype=torch.long)

    def validation_step(self, images, batch_idx):
        recon, q = self.tokenizer(images)
        self._val["psnr"] += float(psnr(recon, images).sum())
        self._val["ssim"] += float(ssim(recon, images).sum())
        self._val["rec"] += float(self.pixel_loss(recon, images, reduction="sum")) / images[0].numel()
        self._val["n"] += images.shape[0]
        if self.tokenizer.continuous:  # latent vectors: no codes to count
            self._val["kl"] += q.stats["kl"] * images.shape[0]
        else:
            self._val["counts"] += torch.bincount(q.codes.flatten().cpu(), minlength=self.tokenizer.codebook_size)
        if "scale_counts" in self._val:
            k = self.tokenizer.codebook_size
            self._val["scale_counts"] += scale_counts(q.codes.cpu(), self.tokenizer.scales, k)
        if batch_idx == 0:
            self._val_example = (images[:8].cpu(), recon[:8].cpu())

    def on_validation_epoch_end(self):
        v, n = self._val, max(self._val["n"], 1)
        metrics = {"val/psnr": v["psnr"] / n, "val/ssim": v["ssim"] / n, "val/rec_loss": v["rec"] / n}
        if self.tokenizer.continuous:
            metrics["val/kl"] = v["kl"] / n
        else:
            stats = code_statistics(v["counts"])
            metrics.update({"val/codebook_usage": stats["codebook_usage"], "val/perplexity": stats["perplexity"]})
        self.log_dict(metrics, prog_bar=True)
        if "scale_counts" in v:
            self.log_dict({f"val/{key}": value for key, value in scale_usage(v["scale_counts"]).items()})
            if not self.trainer.sanity_checking:
                warn_low_usage(v["scale_counts"], self.tokenizer.scales, self.hparams.scale_usage_warning)
        if not self.trainer.sanity_checking and self.trainer.loggers:
            originals, recons = self._val_example
            grid = make_grid(torch.cat([originals, recons]), ncol=originals.shape[0], cell=64)
            log_image(self.trainer.loggers, "val/reconstructions", grid, self.global_step, "top: input, bottom: recon")
            if not self.tokenizer.continuous:
                log_image(self.trainer.loggers, "val/code_usage", usage_histogram(v["counts"]), self.global_step,
                          "uses of each code over the whole validation split, most used first")  # fmt: skip

    def configure_optimizers(self):
        opt = _adamw(self, self.hparams.lr, self.hparams.weight_decay, _use_fused(self.trainer), betas=(0.9, 0.99))
        return _cosine(opt, self.trainer, self.hparams.warmup_steps)

    def export(self, directory: Path, datamodule) -> Path:
        return self.tokenizer.save_pretrained(directory)


def checked_vocab_and_weights(module, vocab, loss_weights, default: dict[str, float]):
    """A stage-2 module's joint vocabulary (from its dict form too) and segment loss weights, or a clear error."""
    if vocab is None:
        raise ValueError(f"{type(module).__name__} needs the joint vocabulary; the CLI links it from data.vocab")
    vocab = JointVocab.from_dict(vocab) if isinstance(vocab, dict) else vocab
    loss_weights = dict(loss_weights or default)
    if set(loss_weights) - {"text", "image"} or any(w < 0 for w in loss_weights.values()):
        raise ValueError(f"loss_weights takes non-negative 'text' and 'image' weights, got {loss_weights}")
    return vocab, loss_weights


class TransformerModule(_ResumeOnThisDevice, L.LightningModule):
    """Stage 2: the decoder-only transformer over joint sequences.

    Args:
        vocab: the joint vocabulary (linked from the data module; not set by hand).
        model: transformer size.
        lr: peak learning rate (cosine decay after warm-up).
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW decay on weight matrices.
        loss_weights: weight of each segment's mean loss, DALL-E style (text 1 : image 7).
        grammar_loss_mask: restrict each position's softmax to the ids the grammar allows there.
        compile: torch.compile the forward of training and validation steps (the weights, state dict
            and sampling stay the plain model's). Off by default: on a 2-core CPU it did not pay
            (`python -m unimodal.bench train --compile`); the first steps compile.
    """

    def __init__(
        self,
        vocab: JointVocab | None = None,
        model: TransformerConfig = TransformerConfig(),  # noqa: B008
        lr: float = 1e-3,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        loss_weights: dict[str, float] | None = None,
        grammar_loss_mask: bool = True,
        compile: bool = False,
    ):
        super().__init__()
        vocab, loss_weights = checked_vocab_and_weights(self, vocab, loss_weights, {"text": 1.0, "image": 7.0})
        self.save_hyperparameters({"vocab": vocab.to_dict(), "model": asdict(model), "lr": lr,
                                   "warmup_steps": warmup_steps, "weight_decay": weight_decay,
                                   "loss_weights": loss_weights, "grammar_loss_mask": grammar_loss_mask,
                                   "compile": compile})  # fmt: skip
        self.vocab = vocab
        self.grammar = SegmentGrammar(vocab)
        self.model = build_transformer(model, vocab)
        self._compiled = None  # (model, torch.compile(model)): a tuple, so no second copy in the state dict
        self.loss_weights = loss_weights

    def _model(self):
        """The model the loss runs: the plain one, or its compiled twin (`compile`; made on first use and
        again if a strategy replaced `self.model`). Sampling always uses the plain one."""
        if not self.hparams.compile:
            return self.model
        if self._compiled is None or self._compiled[0] is not self.model:
            self._compiled = (self.model, torch.compile(self.model))
        return self._compiled[1]

    def _loss(self, batch):
        # next-scale images: block-causal attention over scale queries; raster: the plain forward
        logits = next_scale.teacher_forced_logits(
            self._model(), self.vocab, batch["input_ids"], batch["attention_mask"]
        )
        loss, parts = sequence_loss(logits, batch["input_ids"], batch["attention_mask"], self.grammar,
                                    self.loss_weights, self.hparams.grammar_loss_mask)  # fmt: skip
        if self.vocab.image_scales is not None and not self.training:  # val/loss_image_s{k}: each scale's loss
            parts.update(next_scale.scale_losses(logits, batch["input_ids"], self.vocab))
        return loss, parts

    def training_step(self, batch, batch_idx):
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _val_prefixes(self) -> list[str]:
        """`val/` for the validation split, `val_{split}/` for each of the data module's extra splits."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        return ["val/"] + [f"val_{split}/" for split in getattr(dm, "extra_val_splits", [])]

    def on_validation_epoch_start(self):
        # per loader: summed segment losses and counts, and (batch loss, rows) pairs
        names = ["text", "image", *(f"image_s{k}" for k in range(len(self.vocab.image_scales or ())))]
        self._val = [{k: torch.zeros(2, dtype=torch.float64) for k in names} for _ in self._val_prefixes()]
        self._val_loss = [[] for _ in self._val_prefixes()]

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        loss, parts = self._loss(batch)
        self._val_loss[dataloader_idx].append((float(loss), batch["input_ids"].shape[0]))
        for name, (s, n) in parts.items():
            self._val[dataloader_idx][name] += torch.tensor([float(s), float(n)], dtype=torch.float64)

    def on_validation_epoch_end(self):
        metrics = {}
        for prefix, losses, segments in zip(self._val_prefixes(), self._val_loss, self._val):
            total = sum(n for _, n in losses)
            metrics[f"{prefix}loss"] = sum(loss * n for loss, n in losses) / max(total, 1)
            for name, (s, n) in segments.items():
                metrics[f"{prefix}loss_{name}"] = float(s / max(n, 1))
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "image_unigram_loss"):
            if not hasattr(self, "_unigram"):
                self._unigram = dm.image_unigram_loss()
            if self._unigram is not None:
                metrics["val/loss_image_unigram"] = self._unigram
        self.log_dict(metrics, prog_bar=True, add_dataloader_idx=False)

    def configure_optimizers(self):
        opt = _adamw(self.model, self.hparams.lr, self.hparams.weight_decay, _use_fused(self.trainer))
        return _cosine(opt, self.trainer, self.hparams.warmup_steps)

    def setup(self, stage: str):
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy) and self.trainer.strategy.root_device.type == "cpu":
            raise ValueError("FSDP needs GPUs (torch's FSDP does not run on CPU devices); on CPUs use "
                             "--trainer.strategy ddp, which this model fits in easily")  # fmt: skip

    def plain_model(self):
        """The transformer as one plain module: `self.model`, or under FSDP a full copy gathered from the
        shards. Under FSDP this is a collective call (every process must make it); only process 0 gets
        the copy, the others None."""
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, FSDPStrategy):
            return self.model
        state = strategy.lightning_module_state_dict()  # full (unsharded) weights, on process 0 only
        if not self.trainer.is_global_zero:
            return None
        plain = build_transformer(TransformerConfig(**self.hparams.model), self.vocab)
        plain.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
        return plain.eval()

    def bundle(self, datamodule) -> Bundle | None:
        """The trained system (None on processes other than 0 under FSDP; see `plain_model`)."""
        model = self.plain_model()
        if model is None:
            return None
        return Bundle(datamodule.text_tokenizer, datamodule.image_tokenizer, self.vocab, model,
                      datamodule.source.to_dict())  # fmt: skip

    def export(self, directory: Path, datamodule) -> Path | None:
        bundle = self.bundle(datamodule)
        return bundle.save(directory) if bundle is not None else None
