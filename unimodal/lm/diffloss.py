"""The diffusion head of continuous image tokens (MAR, Li et al. 2024): a small MLP that models
p(x | z), the distribution of one token's latent vector x (D,) given the transformer's output z (Z,)
at that position, through a noise process of `unimodal.diffusion` (DDPM or flow matching).

    loss(target (N, D), z (N, Z), mask (N,)) -> scalar      the denoising loss, `batch_mul` draws per token
    sample(z (N, Z), steps, temperature, cfg_scale, z_uncond) -> x (N, D)

The network is a stack of residual MLP blocks with adaptive layer norm (DiT's adaLN-Zero): every
block normalises its input, then shifts, scales and gates it by vectors computed from the condition
c = embed(t) + proj(z), so the timestep and the transformer's output steer every layer. The
modulations and the output layer start at zero, so each block starts as the identity and the head
as the constant 0 (the mean of the target under either process). The variance of DDPM's reverse
steps is the fixed posterior variance (MAR learns it; fixed keeps the head to one output).

Training draws `batch_mul` (step, noise) pairs per token per optimizer step: the head is cheap next
to the transformer that produced z, so more draws lower the loss's variance for little cost (4 in MAR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unimodal.diffusion import build_process, resolve_sampler


@dataclass
class DiffLossConfig:
    token_dim: int = 16  # D: channels of one continuous image token
    cond_dim: int = 192  # Z: width of the transformer's output
    width: int = 256
    depth: int = 3  # residual adaLN blocks
    process: str = "ddpm"  # ddpm (predicts the noise) | flow (predicts the velocity)
    num_steps: int = 1000  # ddpm: steps of the training chain
    batch_mul: int = 4  # noise draws per token per training step
    sample_steps: int = 100  # ddpm: respaced chain length; flow: Euler steps
    sampler: str | None = None  # ddpm: "ddpm" (ancestral, the default) or "ddim"; flow: "euler"
    # ddpm: bound of each step's x0 estimate (the latents are normalised to unit std); MAR has none, but
    # a small or briefly trained head's noise error at the first step is amplified ~350x without it
    x0_clip: float | None = 5.0

    def __post_init__(self):
        resolve_sampler(self.process, self.sampler)  # refuses an unknown process or a sampler of another one
        if min(self.token_dim, self.cond_dim, self.width, self.depth, self.batch_mul, self.sample_steps) < 1:
            raise ValueError("token_dim, cond_dim, width, depth, batch_mul and sample_steps must be >= 1")
        if self.x0_clip is not None and self.x0_clip <= 0:
            raise ValueError(f"x0_clip must be > 0 or None (no clipping), got {self.x0_clip}")
        if self.process == "ddpm" and not 1 <= self.sample_steps <= self.num_steps:
            raise ValueError(f"sample_steps must be in [1, num_steps={self.num_steps}], got {self.sample_steps}")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (fractional) steps t (N,) -> (N, dim), as in DDPM/DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], -1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class AdaLNBlock(nn.Module):
    """x + gate(c) * MLP(LN(x) * (1 + scale(c)) + shift(c)); modulations zero at init (identity block)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(c).chunk(3, -1)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class DenoiserMLP(nn.Module):
    """(x_t (N, D), t (N,), z (N, Z)) -> the process's target (N, D)."""

    def __init__(self, c: DiffLossConfig, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.time_embed = nn.Sequential(nn.Linear(frequency_dim, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.cond_embed = nn.Linear(c.cond_dim, c.width)
        self.input_proj = nn.Linear(c.token_dim, c.width)
        self.blocks = nn.ModuleList(AdaLNBlock(c.width) for _ in range(c.depth))
        self.final_norm = nn.LayerNorm(c.width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c.width, 2 * c.width))
        self.out = nn.Linear(c.width, c.token_dim)
        for layer in (self.final_modulation[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        c = self.time_embed(timestep_embedding(t, self.frequency_dim).to(x.dtype)) + self.cond_embed(z)  # (N, W)
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(c).chunk(2, -1)
        return self.out(modulate(self.final_norm(h), shift, scale))


class DiffLoss(nn.Module):
    """The head: its denoiser, its noise process, the training loss and guided sampling."""

    def __init__(self, config: DiffLossConfig):
        super().__init__()
        self.config = config
        self.net = DenoiserMLP(config)
        self.process = build_process(config.process, config.num_steps)

    def loss(
        self,
        target: torch.Tensor,
        z: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mean denoising MSE over the tokens where `mask` (N,) is true; target (N, D), z (N, Z).
        Each token is repeated `batch_mul` times with its own step and noise, drawn from `generator`
        (the global generator when None)."""
        m = self.config.batch_mul
        target, z = target.repeat(m, 1), z.repeat(m, 1)  # (m*N, D), (m*N, Z)
        noise = torch.randn(target.shape, dtype=target.dtype, device=target.device, generator=generator)
        x_t, t, goal = self.process.training_example(target, noise, generator=generator)
        per_token = F.mse_loss(self.net(x_t, t, z), goal, reduction="none").mean(-1)  # (m*N,)
        if mask is None:
            return per_token.mean()
        mask = mask.repeat(m).to(per_token.dtype)
        return (per_token * mask).sum() / mask.sum().clamp_min(1)

    @torch.no_grad()
    def sample(
        self,
        z: torch.Tensor,
        steps: int | None = None,
        temperature: float = 1.0,
        cfg_scale: float = 1.0,
        z_uncond: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One latent per row of z (N, Z) -> (N, D). With `z_uncond` (N, Z) the denoiser runs on both
        conditions in one batch and its predictions mix as u + cfg_scale * (c - u) (MAR guides the
        head's prediction this way; the same formula as the LM's logits)."""
        steps = steps or self.config.sample_steps
        noise = torch.randn((z.shape[0], self.config.token_dim), dtype=z.dtype, device=z.device, generator=generator)
        if z_uncond is None and cfg_scale != 1.0:
            raise ValueError("cfg_scale != 1 needs z_uncond, the unconditional transformer output")
        if z_uncond is not None and z_uncond.shape != z.shape:
            raise ValueError(f"z_uncond must have z's shape {tuple(z.shape)}, got {tuple(z_uncond.shape)}")
        net = self.net if z_uncond is None else self._guided(z_uncond, cfg_scale)
        sampler = resolve_sampler(self.config.process, self.config.sampler)
        return self.process.sample(net, z, noise, steps, temperature, sampler, generator=generator,
                                   x0_clip=self.config.x0_clip)  # fmt: skip

    def _guided(self, z_uncond: torch.Tensor, cfg_scale: float):
        """The denoiser under guidance: both conditions in one batch, predictions mixed u + s * (c - u)."""

        def net(x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            cond, uncond = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([z, z_uncond])).chunk(2)
            return uncond + cfg_scale * (cond - uncond)

        return net
