"""Vector quantizers for the image tokenizer, one interface, chosen by name in the config.

forward(z (B, D, h, w)) -> QuantizerOutput(z_q (B, D, h, w), codes (B, h, w), loss, ...)
lookup(codes (B, h, w)) -> z_q (B, D, h, w)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # (B, D, h, w), straight-through: gradients flow to the encoder output
    codes: torch.Tensor  # (B, h, w) int64
    loss: torch.Tensor  # scalar: codebook + commitment terms


class VectorQuantizer(nn.Module):
    """VQ-VAE quantizer: nearest codebook entry, straight-through estimator, commitment loss.

    The codebook is initialised from the first training batch's encoder outputs (as in
    k-means init), which keeps far more codes alive than a random init.
    """

    def __init__(self, codebook_size: int, code_dim: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.codebook = nn.Embedding(codebook_size, code_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor):
        k = self.codebook.num_embeddings
        idx = torch.randint(0, flat.shape[0], (k,), device=flat.device)
        self.codebook.weight.copy_(flat[idx] + 1e-3 * torch.randn_like(flat[idx]))
        self.initialized.fill_(True)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """(M, D) -> (M,) index of the nearest code (squared L2)."""
        w = self.codebook.weight
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ w.t() + w.pow(2).sum(1)[None]
        return d.argmin(1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        if self.training and not bool(self.initialized):
            self._init_from(flat.detach())
        codes = self.nearest(flat)
        q = self.codebook(codes).view(b, h, w, d).permute(0, 3, 1, 2)
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        z_q = z + (q - z).detach()
        return QuantizerOutput(z_q=z_q, codes=codes.view(b, h, w), loss=loss)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codebook(codes).permute(0, 3, 1, 2)


QUANTIZERS: dict[str, type[nn.Module]] = {"vq": VectorQuantizer}


def code_statistics(counts: torch.Tensor) -> dict[str, float]:
    """From a histogram of code use (K,): usage (fraction of codes used) and perplexity."""
    p = counts.float() / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codebook_usage": float((counts > 0).float().mean()), "perplexity": float(entropy.exp())}
