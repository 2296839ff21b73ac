"""Multi-scale residual quantization (VAR, Tian et al. 2024): one image as a pyramid of code maps.

    z (B, D, h, w), scales (s_1 < ... < s_K = h = w)
    residual = z, f_hat = 0
    for k in 1..K:
        codes_k = nearest code of area_downsample(residual, s_k)          (B, s_k, s_k)
        h_k = phi_k(upsample(codebook[codes_k], h))                        (B, D, h, w)
        residual -= h_k;  f_hat += h_k
    decoder input: f_hat = sum_k h_k

All scales share one codebook, kept by one of the single-scale codebook quantizers (`vq`, `ema` or
`l2` of `unimodal.tokenizers.quantizers`, with their first-batch init, dead-code restart, EMA and
entropy term). `phi_k` is a 3x3 convolution mixed in as `(1 - r) * x + r * conv(x)`; `phi_count`
of them are shared by neighbouring scales (scale k uses the one nearest to k / (K - 1) on an even
spread), as VAR does.

Codes are one tensor per image, the scales concatenated coarse to fine, each in raster order:
(B, L) with L = sum s_k^2. `split_scales` cuts it into the per-scale maps [(B, s_k, s_k)].
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from unimodal.tokenizers.quantizers import (
    Quantizer,
    QuantizerOutput,
    VectorQuantizer,
    _to_flat,
    _world_size,
    code_statistics,
)

log = logging.getLogger(__name__)


def check_scales(scales: list[int] | tuple[int, ...], grid: int) -> tuple[int, ...]:
    """The scale list as a tuple, or a ValueError saying what is wrong with it."""
    scales = tuple(int(s) for s in scales)
    if not scales or any(s < 1 for s in scales) or any(a >= b for a, b in zip(scales, scales[1:])):
        raise ValueError(f"scales must be positive and strictly ascending, got {list(scales)}")
    if scales[-1] != grid:
        raise ValueError(f"the last scale must be the latent grid {grid}, got {list(scales)}; e.g. [1, 2, 4, {grid}]")
    return scales


def split_scales(codes: torch.Tensor, scales: tuple[int, ...]) -> list[torch.Tensor]:
    """Concatenated codes (..., L) -> one map per scale [(..., s, s)], coarse to fine."""
    parts = codes.split([s * s for s in scales], dim=-1)
    return [p.reshape(*codes.shape[:-1], s, s) for p, s in zip(parts, scales, strict=True)]


def join_scales(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per-scale maps [(..., s, s)] -> concatenated codes (..., L); the inverse of `split_scales`."""
    return torch.cat([m.flatten(-2) for m in maps], dim=-1)


class Phi(nn.Module):
    """The refinement of an upsampled scale: `(1 - mix) * x + mix * conv3x3(x)`. It lets the coarse
    scales' blocky upsampling be smoothed by a learned filter before it is subtracted."""

    def __init__(self, dim: int, mix: float):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.mix = mix

    def forward(self, x):
        return (1 - self.mix) * x + self.mix * self.conv(x)


class MultiScaleQuantizer(Quantizer):
    """Residual quantization over a pyramid of scales with one shared codebook (`codebook`: a
    `VectorQuantizer` or subclass built without a restart window: restarts happen here, once per step).

    Training loss: the mean over scales of the codebook quantizer's own loss at that scale (codebook
    and commitment terms between the downsampled residual and its codes, entropy term) plus VAR's terms
    on the sum: `mse(f_hat, z.detach())` trains the codebook and the phi convolutions towards the
    encoder output, `beta * mse(z, f_hat.detach())` commits the encoder. The decoder gets f_hat with a
    straight-through gradient to z. With an `ema` codebook, the moving average takes one update per scale
    (the residuals of every scale are what the codes must represent).

    Dead-code restart (`restart_window` steps): a code unused at every scale for that many steps is
    re-seeded from the full-grid encoder outputs. The codes of a step are counted at the start of the
    next one, before any lookup, because re-seeding writes the codebook in place and the lookups of
    every scale (l2's normalisation in particular) must see the codebook autograd saved.
    """

    def __init__(self, codebook: VectorQuantizer, code_dim: int, scales: tuple[int, ...], phi_count: int = 4,
                 phi_mix: float = 0.5, beta: float = 0.25, restart_window: int = 0):  # fmt: skip
        super().__init__()
        if codebook.restart_window:
            raise ValueError("build the shared codebook with restart_window=0; MultiScaleQuantizer restarts codes")
        self.codebook = codebook
        self.scales = tuple(scales)
        self.beta = beta
        self.restart_window = restart_window
        self._last_codes = None  # the previous training step's codes (B, L), for the restart
        self.phis = nn.ModuleList(Phi(code_dim, phi_mix) for _ in range(phi_count))
        n = len(self.scales)
        ticks = torch.linspace(0, 1, phi_count)
        # scale k -> the phi whose tick is nearest to k / (K - 1)
        self.phi_of_scale = [int((ticks - (k / (n - 1) if n > 1 else 1.0)).abs().argmin()) for k in range(n)]

    def set_step(self, step: int):
        self.codebook.set_step(step)

    def __len__(self) -> int:
        return len(self.codebook)

    @property
    def tokens(self) -> int:
        """Codes per image: sum of s^2 over the scales."""
        return sum(s * s for s in self.scales)

    def contribution(self, embedding: torch.Tensor, k: int, size: tuple[int, int]) -> torch.Tensor:
        """Scale k's code embeddings (B, D, s, s) -> its term of f_hat (B, D, h, w): upsampled, then phi."""
        if tuple(embedding.shape[-2:]) != size:
            embedding = F.interpolate(embedding, size=size, mode="bicubic", align_corners=False)
        return self.phis[self.phi_of_scale[k]](embedding)

    def _down(self, x: torch.Tensor, s: int) -> torch.Tensor:
        return x if x.shape[-1] == s else F.interpolate(x, size=(s, s), mode="area")

    def _initialize(self, z: torch.Tensor):
        """Seed every code from the full-grid encoder outputs of the first training batch (rather than
        from the first scale's B vectors, which would be the codebook quantizer's own first call)."""
        cb = self.codebook
        flat = _to_flat(cb._project(z.detach()))
        cb._seed_codes(torch.arange(len(cb), device=z.device), cb._random_rows(flat, len(cb)))
        cb.initialized.fill_(True)

    @torch.no_grad()
    def _restart_dead(self, z: torch.Tensor) -> int:
        """Count the previous step's codes; re-seed codes unused for `restart_window` steps."""
        cb = self.codebook
        counts = torch.bincount(self._last_codes.flatten(), minlength=len(cb))
        if _world_size() > 1:  # a code is alive if any rank used it
            torch.distributed.all_reduce(counts)
        cb.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = (cb.unused_steps >= self.restart_window).nonzero().flatten()
        if dead.numel():
            cb._seed_codes(dead, cb._random_rows(_to_flat(cb._project(z)), dead.numel()))
            cb.unused_steps[dead] = 0
        return int(dead.numel())

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if self.training and not bool(self.codebook.initialized):
            self._initialize(z)
        size = tuple(z.shape[-2:])
        residual, f_hat = z.detach(), torch.zeros_like(z)
        codes, losses, stats = [], [], {}
        if self.training and self.restart_window > 0 and self._last_codes is not None:
            stats["restarted_codes"] = float(self._restart_dead(z.detach()))
        for k, s in enumerate(self.scales):
            q = self.codebook(self._down(residual, s))  # its loss pulls codes towards this scale's residual
            h = self.contribution(self.codebook.lookup(q.codes), k, size)  # gradient to codebook and phi
            residual = residual - h.detach()
            f_hat = f_hat + h
            codes.append(q.codes)
            losses.append(q.loss)
            if "entropy_loss" in q.stats:
                stats[f"entropy_loss_s{k}"] = q.stats["entropy_loss"]
            if self.training:
                stats[f"usage_s{k}"] = _batch_usage(q.codes, len(self))
        loss = torch.stack(losses).mean() + F.mse_loss(f_hat, z.detach()) + self.beta * F.mse_loss(z, f_hat.detach())
        z_q = z + (f_hat - z).detach()  # straight-through to the encoder
        codes = join_scales(codes)  # (B, L)
        if self.training:
            self._last_codes = codes
        return QuantizerOutput(z_q=z_q, codes=codes, loss=loss, stats=stats)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D, h, w) -> codes (B, L), the scales concatenated coarse to fine."""
        size = tuple(z.shape[-2:])
        residual, codes = z, []
        for k, s in enumerate(self.scales):
            c = self.codebook.encode(self._down(residual, s))  # (B, s, s)
            residual = residual - self.contribution(self.codebook.lookup(c), k, size)
            codes.append(c)
        return join_scales(codes)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, L) -> f_hat (B, D, h, w): the sum of every scale's upsampled, phi-refined embeddings."""
        g = self.scales[-1]
        maps = split_scales(codes, self.scales)
        return sum(self.contribution(self.codebook.lookup(c), k, (g, g)) for k, c in enumerate(maps))


def reachable_usage(counts: torch.Tensor) -> float:
    """Codes used over the most that could have been: min(K, positions counted). Coarse scales see few
    positions (s^2 per image), so a plain fraction of K would always look low there. counts: (K,)."""
    reachable = min(counts.numel(), int(counts.sum()))
    return int((counts > 0).sum()) / max(reachable, 1)


def _batch_usage(codes: torch.Tensor, codebook_size: int) -> float:
    return reachable_usage(torch.bincount(codes.flatten(), minlength=codebook_size))


def scale_counts(codes: torch.Tensor, scales: tuple[int, ...], codebook_size: int) -> torch.Tensor:
    """Concatenated codes (B, L) -> per-scale histograms (n_scales, codebook_size)."""
    return torch.stack([torch.bincount(m.flatten(), minlength=codebook_size) for m in split_scales(codes, scales)])


def scale_usage(counts: torch.Tensor) -> dict[str, float]:
    """Per-scale histograms (n_scales, K) -> {"usage_s{k}": reachable usage, "perplexity_s{k}": ...}."""
    out = {}
    for k, row in enumerate(counts):
        out[f"usage_s{k}"] = reachable_usage(row)
        out[f"perplexity_s{k}"] = code_statistics(row)["perplexity"]
    return out


def warn_low_usage(counts: torch.Tensor, scales: tuple[int, ...], threshold: float) -> list[int]:
    """Log a warning for each scale whose reachable usage is under `threshold`; returns those scales."""
    low = []
    for k, (row, s) in enumerate(zip(counts, scales, strict=True)):
        usage = reachable_usage(row)
        if row.sum() > 0 and usage < threshold:
            low.append(k)
            log.warning(
                "scale %d (%dx%d) uses %.1f%% of the codes it could reach (under %.0f%%); consider "
                "restart_window, entropy_weight or scale_codebook: l2", k, s, s, 100 * usage, 100 * threshold,
            )  # fmt: skip
    return low
