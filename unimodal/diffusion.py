"""Noise processes for the diffusion models here (the per-token head, the pixel decoder): DDPM, its
respacing and DDIM, and flow matching.

A process turns a clean vector x0 (N, D) (or an image (N, C, H, W)) into a training example and turns
a denoiser back into samples. The denoiser is any `net(x_t (N, D), t (N,) float, z (N, Z)) -> (N, D)`; what it predicts
is the process's `target`: the noise for DDPM/DDIM, the velocity for flow matching.

    training_example(x0, noise) -> (x_t, t, target)      what the head learns to predict at (x_t, t)
    sample(net, z, noise, steps, temperature, sampler)   noise (N, D) at the chain's start -> x0 (N, D)

**DDPM** (Ho et al. 2020) with the cosine schedule of Nichol & Dhariwal (2021): over T = 1000 steps
alpha_bar(s) = f(s) / f(0), f(s) = cos((s / T + 0.008) / 1.008 * pi / 2)^2, betas
1 - alpha_bar(s + 1) / alpha_bar(s) capped at 0.999 (only the last step reaches the cap). Training
draws one of the T steps; sampling walks a **respaced** chain of `steps` of them: the kept steps
keep their alpha_bar, and the respaced chain's betas follow from it,
beta'_k = 1 - alpha_bar(s_k) / alpha_bar(s_{k-1}), so a model trained on the 1000-step chain serves
any shorter one (as MAR samples 100 steps of a 1000-step head). **Ancestral** sampling draws
x_{k-1} from the Gaussian posterior q(x_{k-1} | x_k, x0_hat) with its fixed variance
beta'_k (1 - alpha_bar_{k-1}) / (1 - alpha_bar_k); **DDIM** with eta = 0 (Song et al. 2021) drops
that noise and moves along the deterministic path x_{k-1} = sqrt(ab_{k-1}) x0_hat + sqrt(1 - ab_{k-1}) eps.

**Flow matching** (rectified flow, Liu et al. 2022; Lipman et al. 2022): x_t = (1 - t) x0 + t noise
for t ~ U(0, 1), the target is the velocity noise - x0, and sampling integrates dx/dt = v from
t = 1 to t = 0 with `steps` Euler steps. The denoiser sees t * 1000, the same range as DDPM steps.

Temperature scales the noise a sampler injects (MAR's temperature): for ancestral DDPM each step's
noise, for the deterministic samplers (DDIM, flow) the starting noise. 1 is the model's distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t, z) -> prediction
PROCESSES = ("ddpm", "flow")
SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("euler",)}


def resolve_sampler(process: str, sampler: str | None) -> str:
    """The sampler to use: `sampler`, or the process's first when None; a sampler of another process is refused.
    (Configs keep None until use, so that changing only the process of a default config stays valid.)"""
    if process not in PROCESSES:
        raise ValueError(f"process must be one of {PROCESSES}, got {process!r}")
    if sampler is None:
        return SAMPLERS[process][0]
    if sampler not in SAMPLERS[process]:
        raise ValueError(f"sampler for {process} must be one of {SAMPLERS[process]}, got {sampler!r}")
    return sampler


def cosine_alpha_bar(s: torch.Tensor, num_steps: int, offset: float = 0.008) -> torch.Tensor:
    """The cosine schedule's closed form f(s) / f(0) at (fractional) steps s in [0, num_steps]."""

    def f(x):
        return torch.cos((x / num_steps + offset) / (1 + offset) * math.pi / 2) ** 2

    return f(s) / f(torch.zeros_like(s))


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """(num_steps,) float64 betas: beta_s = 1 - alpha_bar(s + 1) / alpha_bar(s), capped at `max_beta`
    (the closed form reaches 1 at the last step)."""
    s = torch.arange(num_steps + 1, dtype=torch.float64)
    ab = cosine_alpha_bar(s, num_steps)
    return (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)


def respaced_steps(num_steps: int, steps: int) -> torch.Tensor:
    """`steps` of the chain's indices [0, num_steps), evenly spaced, first and last kept (IDDPM's
    rule for one section): (steps,) int64, increasing."""
    if not 1 <= steps <= num_steps:
        raise ValueError(f"steps must be in [1, {num_steps}], got {steps}")
    if steps == 1:
        return torch.tensor([num_steps - 1])
    stride = (num_steps - 1) / (steps - 1)
    return torch.tensor(sorted({round(i * stride) for i in range(steps)}))


def respaced_betas(alphas_cumprod: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Betas of the chain that visits only the steps `kept` (increasing) of a chain with cumulative
    products `alphas_cumprod`: its own cumulative product equals alphas_cumprod[kept]."""
    ab = alphas_cumprod[kept]
    previous = torch.cat([ab.new_ones(1), ab[:-1]])
    return 1 - ab / previous


def per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, ...) broadcasting over the other dimensions of `like` (vectors or images)."""
    return values.view(-1, *([1] * (like.dim() - 1)))


class GaussianDiffusion:
    """DDPM / DDIM over a cosine schedule of `num_steps` steps; the denoiser predicts the noise."""

    name = "ddpm"

    def __init__(self, num_steps: int = 1000):
        self.num_steps = num_steps
        self.betas = cosine_betas(num_steps)  # float64: the products of 1000 factors
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)

    def training_example(self, x0: torch.Tensor, noise: torch.Tensor, generator=None):
        """x0, noise (N, ...) -> x_t (N, ...), the step t (N,) as float, the target (the noise)."""
        t = torch.randint(0, self.num_steps, (x0.shape[0],), device=x0.device, generator=generator)
        ab = per_example(self.alphas_cumprod.to(x0.device)[t].to(x0.dtype), x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t.to(x0.dtype), noise

    def chain(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The respaced chain of `steps` steps: its original step indices (steps,) and its alpha_bar."""
        kept = respaced_steps(self.num_steps, steps)
        return kept, self.alphas_cumprod[kept]

    @torch.no_grad()
    def sample(self, net: Denoiser, z, noise, steps: int = 100, temperature: float = 1.0, sampler: str = "ddpm",
               generator=None, x0_clip: float | None = None) -> torch.Tensor:  # fmt: skip
        """Walk the respaced chain from x = noise (N, D) at its last step down to x0 (N, D).

        `x0_clip` bounds each step's estimate of x0 to [-x0_clip, x0_clip] (IDDPM clips images to
        [-1, 1]). The first step needs it most: from alpha_bar 2e-9 (step 999) to 3e-4 (step 989 of a
        100-step chain) an error e in the predicted noise moves the mean by about 350 e."""
        if sampler not in SAMPLERS["ddpm"]:
            raise ValueError(f"sampler must be one of {SAMPLERS['ddpm']} for ddpm, got {sampler!r}")
        kept, ab = self.chain(steps)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        betas = respaced_betas(self.alphas_cumprod, kept)
        posterior_var = betas * (1 - ab_prev) / (1 - ab)
        x = noise * temperature if sampler == "ddim" else noise
        for k in reversed(range(len(kept))):
            t = torch.full((x.shape[0],), float(kept[k]), dtype=x.dtype, device=x.device)
            eps = net(x, t, z)
            a, a_prev = float(ab[k]), float(ab_prev[k])
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            if x0_clip is not None:
                x0 = x0.clamp(-x0_clip, x0_clip)
                eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)  # the noise the clipped x0 implies
            if sampler == "ddim":
                x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
                continue
            # posterior mean of q(x_{k-1} | x_k, x0): a mix of the predicted x0 and the current x
            b = float(betas[k])
            x = (b * math.sqrt(a_prev) * x0 + (1 - a_prev) * math.sqrt(1 - b) * x) / (1 - a)
            if k > 0:
                step_noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
                x = x + math.sqrt(float(posterior_var[k])) * temperature * step_noise
        return x


class FlowMatching:
    """Rectified flow: straight paths from data (t = 0) to noise (t = 1); the denoiser predicts the
    velocity noise - x0 and sampling takes Euler steps from t = 1 to t = 0."""

    name = "flow"
    time_scale = 1000.0  # the denoiser's time input is t * 1000, the range of DDPM's steps

    def training_example(self, x0: torch.Tensor, noise: torch.Tensor, generator=None):
        t = torch.rand((x0.shape[0],), device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = (1 - per_example(t, x0)) * x0 + per_example(t, x0) * noise
        return x_t, t * self.time_scale, noise - x0

    @torch.no_grad()
    def sample(self, net: Denoiser, z, noise, steps: int = 25, temperature: float = 1.0, sampler: str = "euler",
               generator=None, x0_clip: float | None = None) -> torch.Tensor:  # fmt: skip
        """Euler steps from x = noise (N, D) at t = 1 to t = 0 (`x0_clip` is DDPM's; the flow needs none)."""
        if sampler not in SAMPLERS["flow"]:
            raise ValueError(f"sampler must be one of {SAMPLERS['flow']} for flow, got {sampler!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        x = noise * temperature
        ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        for k in range(steps):
            t = torch.full((x.shape[0],), float(ts[k]) * self.time_scale, dtype=x.dtype, device=x.device)
            x = x + float(ts[k + 1] - ts[k]) * net(x, t, z)  # dt < 0: towards the data
        return x


def build_process(name: str, num_steps: int = 1000) -> GaussianDiffusion | FlowMatching:
    if name == "ddpm":
        return GaussianDiffusion(num_steps)
    if name == "flow":
        return FlowMatching()
    raise ValueError(f"unknown diffusion process {name!r}; choose one of {PROCESSES}")
