"""The continuous counterpart of a quantizer: a KL-regularised Gaussian latent (`quantizer: kl`).

Same interface as the quantizers, with a latent vector where they have a code id:

    forward(z (B, D, h, w)) -> QuantizerOutput(z_q (B, D, h, w), codes = latents (B, h, w, C), loss, stats)
    encode(z) -> latents (B, h, w, C)      the posterior mean, normalised: deterministic (tokenizing)
    lookup(latents (B, h, w, C)) -> z_q    (detokenizing)

A 1x1 conv turns the encoder output into the mean and log-variance of a diagonal Gaussian with
`latent_dim` (C) channels per position; training decodes a sample of it and adds
`kl_weight * KL(q(latent | x) || N(0, I))` (nats per position), as the KL-f16 autoencoder that MAR
models does. Why this regulariser rather than none: a plain autoencoder's latent may take any scale
and spread its information over directions the decoder reads with arbitrary precision, and stage 2
must then model those exact values; the KL term keeps the latent near a unit Gaussian and the sampling
noise teaches the decoder to ignore small errors, so the small diffusion head of stage 2 models a
smooth, bounded distribution whose imperfect samples still decode to clean images. The weight is
small so reconstructions stay close to an unregularised autoencoder's.

Stage 2 sees latents divided by `latent_std`, a running estimate (over training batches) of the
posterior means' standard deviation, saved with the weights: the diffusion head's noise schedules
assume data of about unit scale (LDM's and MAR's scale factor, measured instead of fixed).
"""

from __future__ import annotations

import torch
from torch import nn

from unimodal.tokenizers.quantizers import Quantizer, QuantizerOutput

CONTINUOUS = ("kl",)  # tokenizer options whose tokens are vectors, not code ids


class GaussianLatent(Quantizer):
    def __init__(self, code_dim: int, latent_dim: int = 16, kl_weight: float = 1e-4, momentum: float = 0.01):
        super().__init__()
        self.latent_dim, self.kl_weight, self.momentum = latent_dim, kl_weight, momentum
        self.to_moments = nn.Conv2d(code_dim, 2 * latent_dim, 1)
        self.proj_out = nn.Conv2d(latent_dim, code_dim, 1)
        self.register_buffer("latent_std", torch.ones(()))
        self.register_buffer("initialized", torch.tensor(False))

    def moments(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output (B, D, h, w) -> mean and log-variance, (B, C, h, w) each."""
        mean, logvar = self.to_moments(z).chunk(2, 1)
        return mean, logvar.clamp(-30.0, 20.0)

    @torch.no_grad()
    def _track_std(self, mean: torch.Tensor):
        std = mean.float().std()
        if bool(self.initialized):
            self.latent_std.lerp_(std, self.momentum)
        else:
            self.latent_std.copy_(std)
            self.initialized.fill_(True)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        mean, logvar = self.moments(z)
        latent = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if self.training else mean
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()  # nats per position
        if self.training:
            self._track_std(mean)
        codes = (mean.detach() / self.latent_std).permute(0, 2, 3, 1)  # (B, h, w, C)
        return QuantizerOutput(z_q=self.proj_out(latent), codes=codes, loss=self.kl_weight * kl,
                               stats={"kl": float(kl.detach()), "latent_std": float(self.latent_std)})  # fmt: skip

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        mean, _ = self.moments(z)
        return (mean / self.latent_std).permute(0, 2, 3, 1)

    def lookup(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj_out(latents.permute(0, 3, 1, 2) * self.latent_std)
