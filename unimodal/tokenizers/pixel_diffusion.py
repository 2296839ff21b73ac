"""A diffusion decoder after the tokens: discrete codes -> pixels by a conditional denoiser.

The VQ decoder maps codes to the mean image they stand for; detail the codes lost (fine texture,
exact edges) comes back blurred. A diffusion decoder instead *samples* an image given the codes
(DALL-E 3's and, by guess, GPT-4o's decoder; DiffuseVAE's two-stage scheme). Here:

    codes --frozen tokenizer--> z_q (B, D, h, w), recon = VQ decoder(z_q) (B, 3, H, W)
    x0 = (image - recon) / residual_scale          the detail the VQ decoder missed, unit-scaled
    denoiser(x_t, t, [recon, upsample(z_q)]) -> the process's target (noise for DDPM, velocity for flow)
    decode(codes) = recon + residual_scale * sample(...)

Why the residual: the VQ decoder already places every outline and colour, so the denoiser only
learns what is missing; scaled to unit variance (`residual_scale` is measured on the first
training batch and saved) it is the kind of target diffusion models learn best, and a sampler
that does badly in few steps can only add noise of the residual's size, not lose the picture.
`predict_residual: false` diffuses the image itself (still conditioned on recon and z_q).

The noise processes (DDPM with respacing and DDIM, rectified flow) are the ones the continuous
model's diffusion head uses, `unimodal.diffusion`; the denoiser is a small U-Net with the
timestep entering every residual block as a scale and shift of its normalisation (adaGN).

The stage-1 tokenizer stays frozen: the encoder, codebook and VQ decoder are not trained here, so
codes (and codes extracted before) stay valid. Trained by `unimodal decoder fit`; saved as a
`pixel_decoder/` folder inside the tokenizer folder, so that every user of the tokenizer
(`sample`, `evaluate`, `reconstruct`, a bundle) decodes with it; `decode(codes, decoder="vq")`
keeps the VQ decoder for comparison.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from unimodal.diffusion import build_process, resolve_sampler
from unimodal.weights import CONFIG_FILE, WEIGHTS_FILE, write_folder

FOLDER = "pixel_decoder"


@dataclass
class PixelDiffusionConfig:
    """The diffusion decoder's architecture and sampler (the conditioning sizes come from the tokenizer)."""

    channels: int = 32  # U-Net width at full resolution; level i has channels * channel_mult[i]
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # a 2x downsample between levels
    num_res_blocks: int = 1  # per level, on the way down and on the way up
    process: str = "flow"  # flow (rectified flow, Euler steps) | ddpm (cosine, 1000 steps)
    sampling_steps: int = 20  # steps of the sampler at decode time (ddpm: a respaced chain)
    sampler: str | None = None  # ddpm: ddpm | ddim; flow: euler (None = the process's first)
    temperature: float = 1.0  # scales the sampler's noise (1 = the model's distribution)
    predict_residual: bool = True  # diffuse image - VQ reconstruction (unit-scaled) instead of the image

    def __post_init__(self):
        self.channel_mult = [int(m) for m in self.channel_mult]
        resolve_sampler(self.process, self.sampler)  # refuses an unknown process or a sampler of another one
        if self.channels < 8 or self.channels % 8 or not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError("channels must be a multiple of 8 and channel_mult a non-empty list of integers >= 1")
        if self.num_res_blocks < 1 or self.sampling_steps < 1 or self.temperature < 0:
            raise ValueError("num_res_blocks and sampling_steps must be >= 1 and temperature >= 0")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) float steps -> (N, dim) sinusoids (the transformer's positional code, over diffusion time)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class TimeResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the time embedding scales and shifts the second normalisation."""

    def __init__(self, ch_in: int, ch_out: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, ch_in), nn.Conv2d(ch_in, ch_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * ch_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, ch_out), nn.Conv2d(ch_out, ch_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(ch_in, ch_out, 1) if ch_in != ch_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class PixelDenoiser(nn.Module):
    """A small U-Net: (x_t (B, 3, H, W), t (B,), cond (B, C, H, W)) -> prediction (B, 3, H, W)."""

    def __init__(self, config: PixelDiffusionConfig, cond_channels: int):
        super().__init__()
        widths = [config.channels * m for m in config.channel_mult]
        emb_dim = 4 * config.channels
        self.time_dim = config.channels
        self.time = nn.Sequential(nn.Linear(config.channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(3 + cond_channels, widths[0], 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        ch, skips = widths[0], []
        for i, w in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                blocks.append(TimeResBlock(ch, w, emb_dim))
                ch = w
            self.down.append(blocks)
            skips.append(ch)
            last = i == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid = TimeResBlock(ch, ch, emb_dim)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            blocks = nn.ModuleList()
            for j in range(config.num_res_blocks):
                blocks.append(TimeResBlock(ch + (skips[i] if j == 0 else 0), w, emb_dim))
                ch = w
            self.up.append(blocks)
            up = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(ch, ch, 3, padding=1))
            self.upsample.append(nn.Identity() if i == 0 else up)
        self.out = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # predicts 0 at the start
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x_t, t, cond):
        emb = self.time(timestep_embedding(t, self.time_dim))
        h = self.stem(torch.cat([x_t, cond], dim=1))
        skips = []
        for blocks, down in zip(self.down, self.downsample, strict=True):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, emb)
        for blocks, up in zip(self.up, self.upsample, strict=True):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
            h = up(h)
        return self.out(h)


class PixelDiffusionDecoder(nn.Module):
    """Codes -> pixels by diffusion, conditioned on what a frozen image tokenizer makes of the codes.

    `tokenizer` is used, never owned: the decoder keeps only its own weights and `residual_scale`."""

    def __init__(self, config: PixelDiffusionConfig, code_dim: int, resolution: int):
        super().__init__()
        self.config = config
        self.code_dim, self.resolution = code_dim, resolution
        if resolution % 2 ** (len(config.channel_mult) - 1):
            raise ValueError(f"resolution {resolution} must halve {len(config.channel_mult) - 1} times; "
                             "use fewer channel_mult levels")  # fmt: skip
        self.net = PixelDenoiser(config, cond_channels=3 + code_dim)
        self.process = build_process(config.process)
        self.register_buffer("residual_scale", torch.zeros(()))  # 0 = not measured yet

    def condition(self, tokenizer, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """codes -> (recon (B, 3, H, W), cond (B, 3 + D, H, W)): the VQ decoder's image and z_q upsampled."""
        z_q = tokenizer.quantizer.lookup(codes)
        recon = tokenizer.decoder(z_q).clamp(-1, 1)
        z_up = F.interpolate(z_q, size=recon.shape[-2:], mode="nearest")
        return recon, torch.cat([recon, z_up], dim=1)

    def _scale(self) -> float:
        return float(self.residual_scale) if self.config.predict_residual else 1.0

    def loss(self, tokenizer, images: torch.Tensor) -> torch.Tensor:
        """The diffusion loss on real images (B, 3, H, W) in [-1, 1], their codes from the frozen tokenizer."""
        with torch.no_grad():
            recon, cond = self.condition(tokenizer, tokenizer.encode(images))
        if self.config.predict_residual and float(self.residual_scale) == 0:
            # measured once, on the first batch, then saved: the residual's typical size
            self.residual_scale.fill_(float((images - recon).std().clamp(min=1e-3)))
        x0 = (images - recon) / self._scale() if self.config.predict_residual else images
        x_t, t, target = self.process.training_example(x0, torch.randn_like(x0))
        return F.mse_loss(self.net(x_t, t, cond), target)

    @torch.no_grad()
    def decode(self, tokenizer, codes: torch.Tensor, steps: int | None = None, generator=None) -> torch.Tensor:
        """codes -> images (B, 3, H, W) in [-1, 1], sampled with the configured sampler."""
        c = self.config
        if c.predict_residual and float(self.residual_scale) == 0:
            raise ValueError("this diffusion decoder was never trained (its residual scale is unmeasured); "
                             "train it with `unimodal decoder fit`")  # fmt: skip
        recon, cond = self.condition(tokenizer, codes)
        noise = torch.randn(recon.shape, dtype=recon.dtype, device=recon.device, generator=generator)
        scale = self._scale()
        # DDPM's x0 estimate is clipped to what an image can be: a residual is at most 2 / scale
        clip = (2.0 / scale) if c.predict_residual else 1.0
        x0 = self.process.sample(
            lambda x, t, z: self.net(x, t, z), cond, noise, steps=steps or c.sampling_steps,
            temperature=c.temperature, sampler=resolve_sampler(c.process, c.sampler), generator=generator,
            x0_clip=clip if c.process == "ddpm" else None,
        )  # fmt: skip
        return ((recon + scale * x0) if c.predict_residual else x0).clamp(-1, 1)

    # ---- persistence: FOLDER/config.json (+ the conditioning sizes) + FOLDER/model.safetensors
    def save_pretrained(self, directory: str | Path) -> Path:
        meta = {**asdict(self.config), "code_dim": self.code_dim, "resolution": self.resolution}
        return write_folder(directory, meta, self.state_dict())

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PixelDiffusionDecoder:
        directory = Path(directory)
        meta = json.loads((directory / CONFIG_FILE).read_text())
        code_dim, resolution = meta.pop("code_dim"), meta.pop("resolution")
        model = cls(PixelDiffusionConfig(**meta), code_dim, resolution)
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        return model.eval()
