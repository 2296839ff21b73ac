"""Thin LightningModules over the plain models, and the callbacks the fit runs use.

The math lives in `image_tokenizer`, `model` and `grammar`; here are only steps, optimizers,
metrics and logging. Metric keys: `train/...`, `val/...`.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

from .bundle import Bundle
from .grammar import SegmentGrammar
from .image_tokenizer import ImageTokenizer, ImageTokenizerConfig, psnr, ssim
from .loggers import log_image
from .model import TransformerConfig, build_transformer, sequence_loss
from .quantizers import code_statistics
from .sampling import SamplingParams, make_grid
from .tokenizer_losses import PatchDiscriminator, adaptive_weight, generator_adv_loss, hinge_d_loss
from .vocab import JointVocab


def _use_fused(trainer) -> bool:
    """The fused AdamW kernel on GPUs (on this project's CPUs it measured 0.99x the default: `bench
    train`), except under fp16 mixed precision, where Lightning's gradient clipping refuses it."""
    return trainer.strategy.root_device.type == "cuda" and str(trainer.precision) != "16-mixed"


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
    ):
        super().__init__()
        if pixel_loss not in ("mse", "l1"):
            raise ValueError(f"pixel_loss must be 'mse' or 'l1', got {pixel_loss!r}")
        if adversarial_weight < 0 or adversarial_start < 0:
            raise ValueError("adversarial_weight and adversarial_start must be >= 0")
        self.save_hyperparameters({"model": asdict(model), "lr": lr, "warmup_steps": warmup_steps,
                                   "weight_decay": weight_decay, "pixel_loss": pixel_loss,
                                   "adversarial_weight": adversarial_weight, "adversarial_start": adversarial_start,
                                   "disc_channels": disc_channels})  # fmt: skip
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
        self._val = {"psnr": 0.0, "ssim": 0.0, "n": 0, "rec": 0.0, "counts": torch.zeros(k, dtype=torch.long)}

    def validation_step(self, images, batch_idx):
        recon, q = self.tokenizer(images)
        self._val["psnr"] += float(psnr(recon, images).sum())
        self._val["ssim"] += float(ssim(recon, images).sum())
        self._val["rec"] += float(self.pixel_loss(recon, images, reduction="sum")) / images[0].numel()
        self._val["n"] += images.shape[0]
        self._val["counts"] += torch.bincount(q.codes.flatten().cpu(), minlength=self.tokenizer.codebook_size)
        if batch_idx == 0:
            self._val_example = (images[:8].cpu(), recon[:8].cpu())

    def on_validation_epoch_end(self):
        v, n = self._val, max(self._val["n"], 1)
        stats = code_statistics(v["counts"])
        self.log_dict({
            "val/psnr": v["psnr"] / n, "val/ssim": v["ssim"] / n, "val/rec_loss": v["rec"] / n,
            "val/codebook_usage": stats["codebook_usage"], "val/perplexity": stats["perplexity"],
        }, prog_bar=True)  # fmt: skip
        if not self.trainer.sanity_checking and self.trainer.loggers:
            originals, recons = self._val_example
            grid = make_grid(torch.cat([originals, recons]), ncol=originals.shape[0], cell=64)
            log_image(self.trainer.loggers, "val/reconstructions", grid, self.global_step, "top: input, bottom: recon")
            log_image(self.trainer.loggers, "val/code_usage", usage_histogram(v["counts"]), self.global_step,
                      "uses of each code over the whole validation split, most used first")  # fmt: skip

    def configure_optimizers(self):
        opt = _adamw(self, self.hparams.lr, self.hparams.weight_decay, _use_fused(self.trainer), betas=(0.9, 0.99))
        return _cosine(opt, self.trainer, self.hparams.warmup_steps)

    def export(self, directory: Path, datamodule) -> Path:
        return self.tokenizer.save_pretrained(directory)


def usage_histogram(counts: torch.Tensor):
    """Per-code use counts (K,) -> a PIL bar chart, codes sorted by use (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots(figsize=(6, 2.5), dpi=100)
    ordered = counts.sort(descending=True).values.numpy()
    ax.bar(range(len(ordered)), ordered + 1, width=1.0)
    ax.set_yscale("log")
    ax.set_xlabel(f"code rank ({int((counts > 0).sum())}/{len(ordered)} used)")
    ax.set_ylabel("uses + 1")
    fig.tight_layout()
    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    plt.close(fig)
    return image


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
        if vocab is None:
            raise ValueError("TransformerModule needs the joint vocabulary; the CLI links it from data.vocab")
        vocab = JointVocab.from_dict(vocab) if isinstance(vocab, dict) else vocab
        loss_weights = dict(loss_weights or {"text": 1.0, "image": 7.0})
        unknown = set(loss_weights) - {"text", "image"}
        if unknown or any(w < 0 for w in loss_weights.values()):
            raise ValueError(f"loss_weights takes non-negative 'text' and 'image' weights, got {loss_weights}")
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
        logits = self._model()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sequence_loss(logits, batch["input_ids"], batch["attention_mask"], self.grammar,
                             self.loss_weights, self.hparams.grammar_loss_mask)  # fmt: skip

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
        self._val = [{k: torch.zeros(2, dtype=torch.float64) for k in ("text", "image")} for _ in self._val_prefixes()]
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

    def bundle(self, datamodule) -> Bundle:
        return Bundle(datamodule.text_tokenizer, datamodule.image_tokenizer, self.vocab, self.model)

    def export(self, directory: Path, datamodule) -> Path:
        return self.bundle(datamodule).save(directory)


class Export(L.Callback):
    """Writes the trained artifact at the end of fit: the image tokenizer folder (stage 1) or the
    bundle (stage 2), into `dir` (default: `{run.root}/{run.name}/export`)."""

    def __init__(self, dir: str | None = None):
        self.dir = dir

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero and not trainer.interrupted:
            path = pl_module.export(Path(self.dir), trainer.datamodule)
            print(f"exported {type(pl_module).__name__.replace('Module', '').lower()} -> {path}")


class SampleGrid(L.Callback):
    """After each validation, generates images for fixed prompts and logs the grid (W&B + PNG file).

    Args:
        prompts: captions to draw; the same ones every validation, so runs are comparable.
        images_per_prompt: samples per caption.
        temperature: sampling temperature.
        top_k: keep the k most likely ids (None = all allowed ids).
        seed: sampling seed (the training RNG is not touched).
        out_dir: folder for `samples_step{N}.png` (default: the run folder).
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        images_per_prompt: int = 4,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
        out_dir: str | None = None,
    ):
        self.prompts = prompts or []
        self.params = SamplingParams(
            temperature=temperature, top_k=top_k, seed=seed, images_per_prompt=images_per_prompt
        )
        self.out_dir = out_dir

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not self.prompts or not trainer.is_global_zero:
            return
        images = pl_module.bundle(trainer.datamodule).generate(self.prompts, self.params)
        labels = [p for p in self.prompts for _ in range(self.params.images_per_prompt)]
        grid = make_grid(images, labels, ncol=self.params.images_per_prompt * 2)
        if self.out_dir:
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            grid.save(Path(self.out_dir) / f"samples_step{trainer.global_step}.png")
        log_image(trainer.loggers, "val/samples", grid, trainer.global_step)


_NOT_METRICS = ("num_captions", "rerank_candidates")  # evaluation settings, not results


class Evaluation(L.Callback):
    """At the end of fit, evaluates the trained system on built-in shapes splits (`evaluate.py`: caption
    fidelity, judge accuracy on real images, the tokenizer's PSNR and fidelity ceiling) and logs
    `eval/{split}/...` to every logger: a row of metrics.csv, the W&B run summary, and a W&B table of
    prompts, generated images and the judge's reading. Also writes `eval_{split}.json` and `.png` into
    the run folder. Off while `splits` is empty; needs the shapes data source.

    Args:
        splits: shapes splits to evaluate, e.g. [test, heldout] (empty = off).
        num_captions: captions generated per split.
        temperature: sampling temperature.
        top_k: keep the k most likely allowed ids (None = all).
        cfg_scale: classifier-free guidance scale (1 = off; needs data.caption_dropout > 0).
        seed: sampling seed.
        rerank: candidates per caption; the contrastive scorer of `rerank.py` (trained on the train
            split, cached in `{run.root}/reranker`) keeps the best (1 = off). The first candidate's
            fidelity is logged too, as `eval/{split}/caption_fidelity_without_rerank`.
        judge_dir: judge cache (default: `{run.root}/judge`, shared by the runs of a family).
        judge_train_images: generated scenes the judge trains on (once per cache).
        reranker_train_pairs: training pairs the reranker trains on (once per cache).
        table_rows: rows per split in the W&B table.
    """

    def __init__(
        self,
        splits: list[str] | None = None,
        num_captions: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        cfg_scale: float = 1.0,
        seed: int = 0,
        rerank: int = 1,
        judge_dir: str | None = None,
        judge_train_images: int = 8000,
        reranker_train_pairs: int = 20000,
        table_rows: int = 32,
    ):
        from .evaluate import SPLITS

        self.splits = list(splits or [])
        unknown = [s for s in self.splits if s not in SPLITS]
        if unknown:
            raise ValueError(f"evaluation.splits takes {list(SPLITS)}, got {unknown}")
        self.num_captions, self.judge_dir, self.table_rows = num_captions, judge_dir, table_rows
        self.judge_train_images = judge_train_images
        if rerank < 1:
            raise ValueError(f"evaluation.rerank is the number of candidates per caption (>= 1), got {rerank}")
        self.rerank, self.reranker_train_pairs = rerank, reranker_train_pairs
        self.params = SamplingParams(temperature=temperature, top_k=top_k, cfg_scale=cfg_scale, seed=seed)
        self._start = None

    def on_fit_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        """After the last step, while the model is still on its device (Lightning moves it to CPU before
        `on_fit_end`). `eval/fit_minutes` is the wall time of this fit session (after a resume: since it)."""
        if not self.splits or trainer.interrupted or not trainer.is_global_zero:
            return
        from .evaluate import evaluate_bundle, write_json
        from .judge import JudgeConfig

        dm = trainer.datamodule
        if getattr(getattr(dm, "source", None), "name", None) != "shapes":
            print("evaluation: skipped (it scores the built-in shapes splits; this run trains on other data)")
            return
        minutes = (time.perf_counter() - self._start) / 60 if self._start else float("nan")
        run_dir = Path(trainer.default_root_dir)
        shapes = dm.source.shapes
        judge = JudgeConfig(shapes.resolution, shapes.background, train_images=self.judge_train_images)
        bundle = pl_module.bundle(dm)
        was_training = bundle.transformer.training
        bundle.transformer.eval()
        metrics, tables = {"eval/fit_minutes": minutes}, {}
        try:
            for split in self.splits:
                details = {}
                result = evaluate_bundle(
                    bundle, split, self.judge_dir or run_dir.parent / "judge", self.num_captions, self.params,
                    shapes=shapes, grid_path=run_dir / f"eval_{split}.png", details=details, judge_config=judge,
                    rerank=self.rerank, reranker_train_pairs=self.reranker_train_pairs,
                )  # fmt: skip
                write_json(result, run_dir / f"eval_{split}.json")
                for key, value in result.items():
                    if isinstance(value, int | float) and not isinstance(value, bool) and key not in _NOT_METRICS:
                        metrics[f"eval/{split}/{key}"] = float(value)
                for key, value in result["fidelity_by_attribute"].items():
                    metrics[f"eval/{split}/fidelity_{key}"] = value
                tables[split] = details
        finally:
            bundle.transformer.train(was_training)
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)
            lg.save()
        _log_eval_tables(trainer.loggers, tables, metrics, self.table_rows)
        print("evaluation: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith("fidelity")))


def _log_eval_tables(loggers, tables: dict, metrics: dict, rows: int):
    """W&B only: the final metrics into the run summary and one table of generated samples."""
    from lightning.pytorch.loggers import WandbLogger
    from PIL import Image

    from .data import tensor_to_image
    from .judge import describe

    for lg in loggers:
        if not isinstance(lg, WandbLogger):
            continue
        import wandb

        table = wandb.Table(columns=["split", "prompt", "image", "judged", "match"])
        for split, d in tables.items():
            for i in range(min(rows, len(d["captions"]))):
                image = wandb.Image(tensor_to_image(d["images"][i]).resize((128, 128), Image.Resampling.NEAREST))
                table.add_data(split, d["captions"][i], image, describe(d["judged"], i), bool(d["match"][i]))
        lg.experiment.log({"eval/samples": table})
        lg.experiment.summary.update(metrics)
