"""The diffusion decoder's fit run: a denoiser from codes to pixels, after stage 1, tokenizer frozen.

    unimodal decoder fit --config experiments/decoder/shapes.yaml --model.tokenizer runs/shapes-tokenizer/export

Validation logs the diffusion loss and, on the first validation batch, PSNR/SSIM of the sampled
decodes beside the VQ decoder's on the same codes (`val/psnr`, `val/psnr_vq`, ...) with a grid
(originals, VQ decoder, diffusion decoder). The export is the tokenizer folder again with the
decoder inside (`pixel_decoder/`): pass it as a stage-2 `--data.image_tokenizer`, or add it to a
trained bundle with `unimodal decoder attach --bundle B --tokenizer EXPORT`.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch

from unimodal.tokenizers.image import WEIGHTS_FILE, ImageTokenizer, psnr, ssim
from unimodal.tokenizers.pixel_diffusion import FOLDER, PixelDiffusionConfig, PixelDiffusionDecoder
from unimodal.training.loggers import log_image
from unimodal.training.modules import _adamw, _cosine, _ResumeOnThisDevice, _use_fused
from unimodal.viz import make_grid


class DecoderModule(_ResumeOnThisDevice, L.LightningModule):
    """Trains a diffusion decoder for a frozen stage-1 tokenizer.

    Args:
        tokenizer: the stage-1 export (or a bundle's image_tokenizer/) whose codes the decoder reads.
        model: the denoiser's architecture, noise process and sampler.
        lr: peak learning rate (cosine decay after warm-up).
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW decay on weight matrices.
        val_images: images of the first validation batch decoded by sampling (PSNR/SSIM, grid).
    """

    def __init__(
        self,
        tokenizer: str = "runs/shapes-tokenizer/export",
        model: PixelDiffusionConfig = PixelDiffusionConfig(),  # noqa: B008 (immutable in practice; CLI needs it)
        lr: float = 1e-3,
        warmup_steps: int = 50,
        weight_decay: float = 0.0,
        val_images: int = 32,
    ):
        super().__init__()
        self.save_hyperparameters({"tokenizer": str(tokenizer), "model": asdict(model), "lr": lr,
                                   "warmup_steps": warmup_steps, "weight_decay": weight_decay,
                                   "val_images": val_images})  # fmt: skip
        self.tokenizer = load_frozen_tokenizer(tokenizer)
        c = self.tokenizer.config
        self.decoder = PixelDiffusionDecoder(model, c.code_dim, c.resolution)

    def train(self, mode: bool = True):
        super().train(mode)
        self.tokenizer.eval()  # frozen: no EMA codebook updates, no restarts
        return self

    def training_step(self, images, batch_idx):
        loss = self.decoder.loss(self.tokenizer, images)
        self.log_dict({"train/loss": loss, "train/residual_scale": self.decoder.residual_scale}, prog_bar=True)
        return loss

    def on_validation_epoch_start(self):
        self._val = {"loss": 0.0, "n": 0}

    def validation_step(self, images, batch_idx):
        with torch.random.fork_rng(devices=[]):  # the training RNG stays exact
            torch.manual_seed(batch_idx)
            self._val["loss"] += float(self.decoder.loss(self.tokenizer, images)) * images.shape[0]
        self._val["n"] += images.shape[0]
        if batch_idx == 0:
            self._val_images = images[: self.hparams.val_images]

    def on_validation_epoch_end(self):
        metrics = {"val/loss": self._val["loss"] / max(self._val["n"], 1)}
        if self.decoder.residual_scale > 0 or not self.decoder.config.predict_residual:
            images = self._val_images
            codes = self.tokenizer.encode(images)
            vq = self.tokenizer.decode(codes, decoder="vq")
            seeded = torch.Generator(images.device).manual_seed(0)
            sampled = self.decoder.decode(self.tokenizer, codes, generator=seeded)
            for suffix, out in (("", sampled), ("_vq", vq)):
                metrics[f"val/psnr{suffix}"] = float(psnr(out, images).mean())
                metrics[f"val/ssim{suffix}"] = float(ssim(out, images).mean())
            if not self.trainer.sanity_checking and self.trainer.loggers:
                n = min(8, images.shape[0])
                grid = make_grid(torch.cat([images[:n], vq[:n], sampled[:n]]).cpu(), ncol=n, cell=64)
                log_image(self.trainer.loggers, "val/decoders", grid, self.global_step,
                          "top: input, middle: VQ decoder, bottom: diffusion decoder")  # fmt: skip
        self.log_dict(metrics, prog_bar=True)

    def configure_optimizers(self):
        opt = _adamw(self.decoder, self.hparams.lr, self.hparams.weight_decay, _use_fused(self.trainer))
        return _cosine(opt, self.trainer, self.hparams.warmup_steps)

    def export(self, directory: Path, datamodule) -> Path:
        """The tokenizer folder again, with this decoder inside."""
        self.tokenizer.save_pretrained(directory)
        self.decoder.save_pretrained(directory / FOLDER)
        return directory


def tokenizer_folder(path: str | Path) -> Path:
    """A tokenizer folder, or a bundle's image_tokenizer/."""
    folder = Path(path)
    return folder / "image_tokenizer" if (folder / "image_tokenizer").is_dir() else folder


def load_frozen_tokenizer(path: str | Path) -> ImageTokenizer:
    """A stage-1 tokenizer folder (or a bundle, whose image_tokenizer/ is used) without gradients and
    without a diffusion decoder of its own."""
    tokenizer = ImageTokenizer.from_pretrained(tokenizer_folder(path))
    if tokenizer.continuous:
        raise ValueError(f"{path} is a continuous (kl) tokenizer; the diffusion decoder reads discrete codes")
    tokenizer.pixel_decoder = None
    tokenizer.requires_grad_(False)
    return tokenizer.eval()


def attach(bundle: str | Path, tokenizer: str | Path) -> Path:
    """Copy the diffusion decoder of `tokenizer` (a `decoder fit` export) into a trained bundle whose
    image tokenizer is the same (identical weights), replacing any decoder it had. Returns the folder."""
    bundle_tok = Path(bundle) / "image_tokenizer"
    source = Path(tokenizer)
    if not (bundle_tok / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{bundle} is not a bundle (no image_tokenizer/{WEIGHTS_FILE})")
    if not (source / FOLDER).is_dir():
        raise FileNotFoundError(f"{tokenizer} has no {FOLDER}/; give the export of `unimodal decoder fit`")
    if (source / WEIGHTS_FILE).read_bytes() != (bundle_tok / WEIGHTS_FILE).read_bytes():
        raise ValueError(f"the decoder in {tokenizer} was trained for another image tokenizer than {bundle}'s; "
                         f"train one with --model.tokenizer {bundle_tok}")  # fmt: skip
    tmp = bundle_tok / (FOLDER + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source / FOLDER, tmp)
    shutil.rmtree(bundle_tok / FOLDER, ignore_errors=True)
    tmp.replace(bundle_tok / FOLDER)
    return bundle_tok / FOLDER
