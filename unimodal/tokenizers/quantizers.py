"""The quantizer family of the image tokenizer, one interface, chosen by name in the config.

    forward(z (B, D, h, w)) -> QuantizerOutput(z_q (B, D, h, w), codes (B, h, w), loss, stats)
    encode(z (B, D, h, w)) -> codes (B, h, w)     deterministic, no side effects (tokenizing)
    lookup(codes (B, h, w)) -> z_q (B, D, h, w)   (detokenizing)
    set_step(step)                                training step, for schedules (Gumbel temperature) and
                                                  the seed of a codebook's random draws

| name     | what                                                                  | as in                  |
|----------|-----------------------------------------------------------------------|------------------------|
| `vq`     | nearest code (L2), codebook + commitment loss, straight-through       | VQ-VAE                 |
| `ema`    | nearest code, codebook = EMA of its assigned encoder outputs          | VQ-VAE-2               |
| `l2`     | L2-normalised low-dim codes (`lookup_dim`), cosine lookup             | ViT-VQGAN, LlamaGen    |
| `gumbel` | K logits, Gumbel-softmax relaxation + KL to uniform; argmax at eval   | DALL-E dVAE            |
| `fsq`    | per-channel rounding to `fsq_levels` values; K = prod(levels)         | FSQ (Mentzer et al.)   |

The codebook variants (`vq`, `ema`, `l2`) start from the first training batch's encoder outputs
and can re-seed codes unused for `restart_window` training steps from the current batch
(`stats["restarted_codes"]`). They can also add an entropy term (`entropy_weight`, as in MaskGIT /
LlamaGen): each position's soft assignment over the codes should be confident, while the batch's
average assignment should spread over the whole codebook.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # (B, D, h, w); gradients flow to the encoder output (straight-through or relaxed)
    codes: torch.Tensor  # (B, h, w) int64
    loss: torch.Tensor  # scalar: codebook/commitment or KL terms, already weighted
    stats: dict[str, float] = field(default_factory=dict)  # extra training metrics (train/<key>)


def _to_flat(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B, D, h, w) -> (B*h*w, D)


def _from_flat(flat: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    return flat.view(b, h, w, -1).permute(0, 3, 1, 2)  # (B*h*w, D) -> (B, D, h, w)


class Quantizer(nn.Module):
    def set_step(self, step: int):
        """Training step (the LightningModule calls this before each step); only schedules use it."""


# ----------------------------------------------------------------------------- codebook variants


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(M, d) on each rank -> (world * M, d), rank 0's rows first (equal M on every rank)."""
    if _world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over ranks, differentiable (equal batch sizes on every rank); `x` itself on one process.
    The backward sums every rank's gradient, and DDP then averages: the same gradient one process gets."""
    if _world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x) / _world_size()


class VectorQuantizer(Quantizer):
    """VQ-VAE: nearest codebook entry, straight-through estimator, codebook + commitment loss.

    The codebook is initialised from the first training batch's encoder outputs (k-means style
    init), which keeps far more codes alive than a random init. Subclasses change the space the
    lookup happens in (`_project`) and how the codebook learns (`_codebook_loss`).
    """

    def __init__(self, codebook_size: int, code_dim: int, beta: float = 0.25, restart_window: int = 0,
                 lookup_dim: int | None = None, entropy_weight: float = 0.0,
                 entropy_temperature: float = 0.01):  # fmt: skip
        super().__init__()
        self.beta = beta
        self.restart_window = restart_window
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature
        self.codebook = nn.Embedding(codebook_size, lookup_dim or code_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))
        self.step = 0

    def set_step(self, step: int):
        self.step = step

    def _project(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, D, h, w) -> the lookup space (B, d, h, w)."""
        return z

    def _unproject(self, q: torch.Tensor) -> torch.Tensor:
        """Lookup space (B, d, h, w) -> decoder input (B, D, h, w)."""
        return q

    def _weights(self) -> torch.Tensor:
        return self.codebook.weight

    @torch.no_grad()
    def _seed_codes(self, idx: torch.Tensor, vectors: torch.Tensor):
        """Overwrite codes `idx` (n,) with `vectors` (n, d)."""
        self.codebook.weight[idx] = vectors

    def _codebook_loss(self, flat: torch.Tensor, q: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(q, flat.detach())

    def _distances(self, flat: torch.Tensor) -> torch.Tensor:
        """(M, d) -> (M, K) squared L2 distance to every code."""
        w = self._weights()
        return flat.pow(2).sum(1, keepdim=True) - 2 * flat @ w.t() + w.pow(2).sum(1)[None]

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """(M, d) -> (M,) index of the nearest code (squared L2)."""
        return self._distances(flat).argmin(1)

    def _entropy_loss(self, flat: torch.Tensor) -> torch.Tensor:
        """Mean per-position entropy of softmax(-distance / T) minus the entropy of the batch's mean
        assignment (MaskGIT / LlamaGen): each position picks one code, the batch spreads over many.

        Computed in fp32 (autocast off). The batch term is not linear in the batch, so under DDP the
        mean assignment is all-reduced with autograd across ranks: N processes then match one process
        with the whole batch. For `ema` the codebook takes no gradient, so the term moves only the
        encoder; T = 0.01 suits distances of the size `l2`'s unit-norm codes give (<= 4)."""
        with torch.autocast(flat.device.type, enabled=False):
            flat = flat.float()
            log_p = (-self._distances(flat) / self.entropy_temperature).log_softmax(1)  # (M, K)
            p = log_p.exp()
            per_position = -(p * log_p).sum(1).mean()
            mean_p = _all_reduce_mean(p.mean(0))
            batch = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
        return per_position - batch

    @torch.no_grad()
    def _random_rows(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        """`n` rows of the *global* batch (under DDP: ranks' rows in rank order), slightly jittered.

        The draws come from a generator seeded by (run seed, training step), not from the global RNG,
        whose state at this point differs between a 1-process and an N-process run (and could differ
        between ranks): so every rank seeds identical codes, and N processes match one process with the
        whole batch."""
        flat = _all_gather_rows(flat)
        g = torch.Generator(device=flat.device).manual_seed((torch.initial_seed() * 1_000_003 + self.step) % 2**63)
        idx = torch.randint(0, flat.shape[0], (n,), device=flat.device, generator=g)
        noise = torch.randn((n, flat.shape[1]), device=flat.device, dtype=flat.dtype, generator=g)
        return flat[idx] + 1e-3 * flat.std() * noise

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor, codes: torch.Tensor) -> int:
        """Re-seed codes unused for `restart_window` steps from this batch's encoder outputs."""
        counts = torch.bincount(codes, minlength=self.unused_steps.numel())
        if _world_size() > 1:  # a code is alive if any rank used it
            torch.distributed.all_reduce(counts)
        used = counts > 0
        self.unused_steps.add_(1).masked_fill_(used, 0)
        dead = (self.unused_steps >= self.restart_window).nonzero().flatten()
        if dead.numel():
            self._seed_codes(dead, self._random_rows(flat, dead.numel()))
            self.unused_steps[dead] = 0
        return int(dead.numel())

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, _, h, w = z.shape
        flat = _to_flat(self._project(z))  # (B*h*w, d)
        if self.training and not bool(self.initialized):
            self._seed_codes(torch.arange(self.codebook.num_embeddings), self._random_rows(flat.detach(), len(self)))
            self.initialized.fill_(True)
        codes = self.nearest(flat.detach())
        stats = {}
        if self.training and self.restart_window > 0:  # before the lookup: autograd must see the final codebook
            stats["restarted_codes"] = float(self._restart_dead(flat.detach(), codes))
        q = self._weights()[codes]  # (B*h*w, d); restarted codes are unused in this batch, so q is unchanged
        loss = self._codebook_loss(flat, q, codes) + self.beta * F.mse_loss(flat, q.detach())
        if self.training and self.entropy_weight > 0:
            entropy = self._entropy_loss(flat)
            loss = loss + self.entropy_weight * entropy
            stats["entropy_loss"] = float(entropy.detach())
        q = flat + (q - flat).detach()  # straight-through
        return QuantizerOutput(z_q=self._unproject(_from_flat(q, b, h, w)), codes=codes.view(b, h, w),
                               loss=loss, stats=stats)  # fmt: skip

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        b, _, h, w = z.shape
        return self.nearest(_to_flat(self._project(z))).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return self._unproject(self._weights()[codes].permute(0, 3, 1, 2))

    def __len__(self) -> int:
        return self.codebook.num_embeddings


class EMAQuantizer(VectorQuantizer):
    """VQ-VAE-2: the codebook is not trained by gradient but is the exponential moving average of
    the encoder outputs assigned to each code (Laplace-smoothed counts); only the commitment loss
    remains."""

    def __init__(self, codebook_size: int, code_dim: int, beta: float = 0.25, restart_window: int = 0,
                 decay: float = 0.99, eps: float = 1e-5, **entropy):  # fmt: skip
        super().__init__(codebook_size, code_dim, beta, restart_window, **entropy)
        self.decay, self.eps = decay, eps
        self.codebook.weight.requires_grad_(False)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", self.codebook.weight.detach().clone())

    @torch.no_grad()
    def _seed_codes(self, idx: torch.Tensor, vectors: torch.Tensor):
        self.codebook.weight[idx] = vectors
        self.embed_sum[idx] = vectors
        self.cluster_size[idx] = 1.0

    def _codebook_loss(self, flat: torch.Tensor, q: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._ema_update(flat.detach(), codes)
        return flat.new_zeros(())

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor):
        k = len(self)
        onehot = F.one_hot(codes, k).type_as(flat)  # (M, K)
        counts, sums = onehot.sum(0), onehot.t() @ flat  # (K,), (K, d)
        if _world_size() > 1:  # statistics of the global batch, so every rank keeps the same codebook
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        self.embed_sum.lerp_(sums, 1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + k * self.eps) * n
        self.codebook.weight.copy_(self.embed_sum / smoothed[:, None])


class L2Quantizer(VectorQuantizer):
    """ViT-VQGAN / LlamaGen: project to a low-dimensional space (`lookup_dim`), L2-normalise both
    the projected encoder output and the codes, pick the code of highest cosine similarity. Small
    normalised codes keep usage high with large codebooks."""

    def __init__(self, codebook_size: int, code_dim: int, beta: float = 0.25, restart_window: int = 0,
                 lookup_dim: int = 8, **entropy):  # fmt: skip
        super().__init__(codebook_size, code_dim, beta, restart_window, lookup_dim, **entropy)
        self.proj_in = nn.Conv2d(code_dim, lookup_dim, 1) if lookup_dim != code_dim else nn.Identity()
        self.proj_out = nn.Conv2d(lookup_dim, code_dim, 1) if lookup_dim != code_dim else nn.Identity()

    def _project(self, z):
        return F.normalize(self.proj_in(z), dim=1)

    def _unproject(self, q):
        return self.proj_out(q)

    def _weights(self):
        return F.normalize(self.codebook.weight, dim=1)


# ----------------------------------------------------------------------------- DALL-E's dVAE


class GumbelQuantizer(Quantizer):
    """DALL-E's discrete VAE: the encoder output becomes K logits per position. Training feeds the
    decoder a Gumbel-softmax mixture of codebook vectors (temperature annealed from
    `temperature[0]` to `temperature[1]` over `anneal_steps`, geometrically) and adds
    `kl_weight * KL(q(code | x) || uniform)`; inference takes the argmax (a hard code)."""

    def __init__(self, codebook_size: int, code_dim: int, temperature: tuple[float, float] = (1.0, 0.0625),
                 anneal_steps: int = 1000, kl_weight: float = 1e-3):  # fmt: skip
        super().__init__()
        self.to_logits = nn.Conv2d(code_dim, codebook_size, 1)
        self.codebook = nn.Embedding(codebook_size, code_dim)
        self.start, self.end = temperature
        self.anneal_steps = anneal_steps
        self.kl_weight = kl_weight
        self.temperature = self.start

    def set_step(self, step: int):
        frac = min(step / max(self.anneal_steps, 1), 1.0)
        self.temperature = self.start * (self.end / self.start) ** frac

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        logits = self.to_logits(z)  # (B, K, h, w)
        if not self.training:
            codes = logits.argmax(1)
            return QuantizerOutput(z_q=self.lookup(codes), codes=codes, loss=logits.new_zeros(()))
        soft = F.gumbel_softmax(logits, tau=self.temperature, hard=False, dim=1)  # (B, K, h, w)
        z_q = torch.einsum("bkhw,kd->bdhw", soft, self.codebook.weight)
        log_q = logits.log_softmax(1)
        kl = (log_q.exp() * (log_q + math.log(logits.shape[1]))).sum(1).mean()  # KL(q || uniform), nats
        return QuantizerOutput(z_q=z_q, codes=soft.argmax(1), loss=self.kl_weight * kl,
                               stats={"temperature": self.temperature, "kl": float(kl.detach())})  # fmt: skip

    @torch.no_grad()
    def encode(self, z):
        return self.to_logits(z).argmax(1)

    def lookup(self, codes):
        return self.codebook(codes).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- FSQ


class FSQuantizer(Quantizer):
    """Finite scalar quantization: project to len(levels) channels, bound channel i to levels[i]
    values with a tanh, round (straight-through). The implicit codebook is the grid of
    prod(levels) points, so there is nothing to collapse and no auxiliary loss."""

    def __init__(self, code_dim: int, levels: list[int]):
        super().__init__()
        self.register_buffer("levels", torch.tensor(levels), persistent=False)
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]]), 0)
        self.register_buffer("basis", basis, persistent=False)
        self.proj_in = nn.Conv2d(code_dim, len(levels), 1)
        self.proj_out = nn.Conv2d(len(levels), code_dim, 1)

    def _quantize(self, z: torch.Tensor) -> torch.Tensor:
        """(B, L, h, w) -> values on the grid, in [-1, 1] per channel (straight-through round)."""
        lv = self.levels.view(1, -1, 1, 1).to(z.dtype)
        half_l = (lv - 1) * (1 - 1e-3) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0)
        bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset  # even levels are asymmetric
        rounded = bounded + (bounded.round() - bounded).detach()
        return rounded / (lv // 2)

    def _codes(self, zhat: torch.Tensor) -> torch.Tensor:
        half = (self.levels // 2).view(1, -1, 1, 1)
        digits = (zhat * half + half).round().long()  # (B, L, h, w) in [0, levels)
        return (digits * self.basis.view(1, -1, 1, 1)).sum(1)

    def forward(self, z):
        zhat = self._quantize(self.proj_in(z))
        return QuantizerOutput(z_q=self.proj_out(zhat), codes=self._codes(zhat), loss=z.new_zeros(()))

    @torch.no_grad()
    def encode(self, z):
        return self._codes(self._quantize(self.proj_in(z)))

    def lookup(self, codes):
        digits = (codes[:, None] // self.basis.view(1, -1, 1, 1)) % self.levels.view(1, -1, 1, 1)
        half = (self.levels // 2).view(1, -1, 1, 1)
        return self.proj_out((digits - half).float() / half)


QUANTIZERS = ("vq", "ema", "l2", "gumbel", "fsq")
CODEBOOK_QUANTIZERS = ("vq", "ema", "l2")  # the ones with codes that can die (and be restarted)


def code_statistics(counts: torch.Tensor) -> dict[str, float]:
    """From a histogram of code use (K,): usage (fraction of codes used) and perplexity."""
    p = counts.float() / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codebook_usage": float((counts > 0).float().mean()), "perplexity": float(entropy.exp())}
