"""Image tokenizer: a VQ autoencoder. Its encoder+quantizer tokenizes, its decoder detokenizes.

    images (B, 3, H, W) in [-1, 1] --encoder--> z (B, D, h, w) --quantizer--> codes (B, h, w) in [0, K)
    codes --lookup--> z_q (B, D, h, w) --decoder--> images (B, 3, H, W)

With `quantizer: multiscale` (VAR's multi-scale residual quantizer, `tokenizers/multiscale.py`) the
codes are the scales' maps concatenated coarse to fine: (B, L) with L = sum of s^2 over `scales`.

With `quantizer: kl` the same autoencoder has a continuous Gaussian latent instead of a quantizer
(`unimodal.tokenizers.latent`): its tokens are vectors, latents (B, h, w, latent_dim), in place of codes.

Saved as a folder with `config.json` (the `ImageTokenizerConfig`) and `model.safetensors`. A folder
may also hold `pixel_decoder/`, a diffusion decoder trained after stage 1 (`tokenizers/pixel_diffusion.py`,
`unimodal decoder fit`): `decode` then samples pixels with it, and `decode(codes, decoder="vq")` keeps
the VQ decoder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from unimodal.tokenizers.latent import CONTINUOUS, GaussianLatent
from unimodal.tokenizers.multiscale import MultiScaleQuantizer, check_scales
from unimodal.tokenizers.pixel_diffusion import FOLDER as PIXEL_DECODER_FOLDER
from unimodal.tokenizers.pixel_diffusion import PixelDiffusionDecoder
from unimodal.tokenizers.quantizers import (
    CODEBOOK_QUANTIZERS,
    QUANTIZERS,
    EMAQuantizer,
    FSQuantizer,
    GumbelQuantizer,
    L2Quantizer,
    Quantizer,
    QuantizerOutput,
    VectorQuantizer,
    code_statistics,
)
from unimodal.weights import CONFIG_FILE, WEIGHTS_FILE, write_folder

MULTISCALE = "multiscale"

DECODERS = ("auto", "vq", "diffusion")  # what `decode` can turn codes into pixels with


@dataclass
class ImageTokenizerConfig:
    resolution: int = 32
    channels: int = 32  # stem width; level i has channels * channel_mult[i]
    channel_mult: list[int] = field(default_factory=lambda: [2, 4])  # one stride-2 downsample per entry
    num_res_blocks: int = 1
    code_dim: int = 32
    codebook_size: int = 512
    quantizer: str = "vq"  # vq | ema | l2 | gumbel | fsq (see unimodal.quantizers) | multiscale | kl (continuous)
    beta: float = 0.25  # commitment weight (vq, ema, l2)
    restart_window: int = 0  # vq/ema/l2: re-seed codes unused for this many training steps (0 = never)
    entropy_weight: float = 0.0  # vq/ema/l2: weight of the codebook entropy term (0 = off; MaskGIT/LlamaGen)
    entropy_temperature: float = 0.01  # vq/ema/l2: softmax temperature over -distance for that term
    ema_decay: float = 0.99  # ema: codebook moving-average decay
    lookup_dim: int = 8  # l2: dimension of the normalised codes (1x1 projections in/out of code_dim)
    gumbel_temperature: list[float] = field(default_factory=lambda: [1.0, 0.0625])  # gumbel: start, end
    gumbel_anneal_steps: int = 1000  # gumbel: steps of the geometric temperature decay
    gumbel_kl_weight: float = 1e-3  # gumbel: weight of KL(q || uniform prior)
    fsq_levels: list[int] = field(default_factory=lambda: [8, 8, 4, 4])  # fsq: values per channel
    scales: list[int] | None = None  # multiscale: ascending side lengths ending at the grid, e.g. [1, 2, 4, 8]
    scale_codebook: str = "vq"  # multiscale: the codebook quantizer every scale shares (vq | ema | l2)
    phi_count: int = 4  # multiscale: refinement convolutions, shared by neighbouring scales
    phi_mix: float = 0.5  # multiscale: (1 - mix) * x + mix * conv(x)
    latent_dim: int = 16  # kl: channels of the Gaussian latent (one image token's vector)
    kl_weight: float = 1e-4  # kl: weight of KL(q || N(0, I)) in nats per position

    def __post_init__(self):
        self.channel_mult = list(self.channel_mult)
        self.gumbel_temperature = [float(t) for t in self.gumbel_temperature]
        self.fsq_levels = [int(v) for v in self.fsq_levels]
        if self.quantizer not in (*QUANTIZERS, MULTISCALE, *CONTINUOUS):
            raise ValueError(
                f"unknown quantizer {self.quantizer!r}; choose one of {[*QUANTIZERS, MULTISCALE, *CONTINUOUS]}"
            )
        self._check_multiscale()
        if self.latent_dim < 1 or self.kl_weight < 0:
            raise ValueError(f"latent_dim must be >= 1 and kl_weight >= 0, got {self.latent_dim}, {self.kl_weight}")
        if self.restart_window < 0:
            raise ValueError(f"restart_window must be >= 0 (0 = no restart), got {self.restart_window}")
        if self.restart_window and self.codebook_quantizer not in CODEBOOK_QUANTIZERS:
            raise ValueError(
                f"restart_window applies to codebook quantizers {list(CODEBOOK_QUANTIZERS)}, not "
                f"{self.quantizer!r}; set restart_window: 0"
            )
        if self.entropy_weight < 0 or self.entropy_temperature <= 0:
            raise ValueError("entropy_weight must be >= 0 and entropy_temperature > 0")
        if self.entropy_weight and self.codebook_quantizer not in CODEBOOK_QUANTIZERS:
            raise ValueError(
                f"entropy_weight applies to codebook quantizers {list(CODEBOOK_QUANTIZERS)}, not "
                f"{self.quantizer!r}; set entropy_weight: 0"
            )
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.lookup_dim < 1:
            raise ValueError(f"lookup_dim must be >= 1, got {self.lookup_dim}")
        t = self.gumbel_temperature
        if len(t) != 2 or not t[0] >= t[1] > 0:
            raise ValueError(f"gumbel_temperature must be [start, end] with start >= end > 0, got {t}")
        if self.gumbel_anneal_steps < 1 or self.gumbel_kl_weight < 0:
            raise ValueError("gumbel_anneal_steps must be >= 1 and gumbel_kl_weight >= 0")
        if self.quantizer == "fsq":
            if any(v < 2 for v in self.fsq_levels) or not self.fsq_levels:
                raise ValueError(f"fsq_levels must be a non-empty list of integers >= 2, got {self.fsq_levels}")
            product = 1
            for v in self.fsq_levels:
                product *= v
            if product != self.codebook_size:
                raise ValueError(
                    f"fsq_levels {self.fsq_levels} give {product} codes but codebook_size is {self.codebook_size}; "
                    f"set codebook_size: {product} or change the levels"
                )
        factor = self.downsample
        if self.resolution % factor:
            raise ValueError(f"resolution {self.resolution} must be divisible by the downsampling {factor}")
        if self.grid_size**2 > 256:
            raise ValueError(f"{self.grid_size}x{self.grid_size} codes is over the 256 image-token budget")
        if self.codebook_size < 2 or self.code_dim < 1:
            raise ValueError("codebook_size must be >= 2 and code_dim >= 1")

    def _check_multiscale(self):
        if self.quantizer != MULTISCALE:
            if self.scales is not None:
                raise ValueError(f"scales applies to quantizer: {MULTISCALE}, not {self.quantizer!r}; remove it")
            return
        if self.scales is None:
            example = [1, 2, 4, self.grid_size]
            raise ValueError(f"quantizer: {MULTISCALE} needs scales ending at the grid, e.g. {example}")
        self.scales = list(check_scales(self.scales, self.grid_size))
        if self.scale_codebook not in CODEBOOK_QUANTIZERS:
            raise ValueError(f"scale_codebook must be one of {list(CODEBOOK_QUANTIZERS)}, got {self.scale_codebook!r}")
        if self.phi_count < 1 or not 0.0 <= self.phi_mix <= 1.0:
            raise ValueError(f"phi_count must be >= 1 and phi_mix in [0, 1], got {self.phi_count}, {self.phi_mix}")

    @property
    def codebook_quantizer(self) -> str:
        """The quantizer that owns the codebook: `scale_codebook` under multiscale, else `quantizer`."""
        return self.scale_codebook if self.quantizer == MULTISCALE else self.quantizer

    @property
    def downsample(self) -> int:
        return 2 ** len(self.channel_mult)

    @property
    def grid_size(self) -> int:
        return self.resolution // self.downsample


def build_quantizer(c: ImageTokenizerConfig) -> Quantizer:
    """The quantizer named by `c.quantizer`, with its options from the config."""
    if c.quantizer == MULTISCALE:  # the shared codebook is a single-scale quantizer that never restarts itself
        codebook = build_quantizer(replace(c, quantizer=c.scale_codebook, scales=None, restart_window=0))
        return MultiScaleQuantizer(codebook, c.code_dim, tuple(c.scales), c.phi_count, c.phi_mix, c.beta,
                                   c.restart_window)  # fmt: skip
    common = dict(beta=c.beta, restart_window=c.restart_window, entropy_weight=c.entropy_weight,
                  entropy_temperature=c.entropy_temperature)  # fmt: skip
    if c.quantizer == "vq":
        return VectorQuantizer(c.codebook_size, c.code_dim, **common)
    if c.quantizer == "ema":
        return EMAQuantizer(c.codebook_size, c.code_dim, **common, decay=c.ema_decay)
    if c.quantizer == "l2":
        return L2Quantizer(c.codebook_size, c.code_dim, **common, lookup_dim=c.lookup_dim)
    if c.quantizer == "gumbel":
        return GumbelQuantizer(c.codebook_size, c.code_dim, tuple(c.gumbel_temperature), c.gumbel_anneal_steps,
                               c.gumbel_kl_weight)  # fmt: skip
    if c.quantizer == "fsq":
        return FSQuantizer(c.code_dim, c.fsq_levels)
    if c.quantizer == "kl":
        return GaussianLatent(c.code_dim, c.latent_dim, c.kl_weight)
    raise ValueError(f"unknown quantizer {c.quantizer!r}; choose one of {QUANTIZERS}")


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
            nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
        )  # fmt: skip

    def forward(self, x):
        return x + self.block(x)


class Encoder(nn.Module):
    """Stem conv at full resolution, then per level a stride-2 conv and residual blocks."""

    def __init__(self, c: ImageTokenizerConfig):
        super().__init__()
        ch = c.channels
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 3, padding=1)]
        for mult in c.channel_mult:
            out = c.channels * mult
            layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1)]  # halves H and W
            layers += [ResBlock(out) for _ in range(c.num_res_blocks)]
            ch = out
        layers += [nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, c.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # (B, 3, H, W) -> (B, D, h, w)
        return self.net(x)


class Decoder(nn.Module):
    """Mirror of the encoder: residual blocks per level, nearest upsampling + conv between levels."""

    def __init__(self, c: ImageTokenizerConfig):
        super().__init__()
        ch = c.channels * c.channel_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(c.code_dim, ch, 3, padding=1)]
        for mult in reversed([1, *c.channel_mult[:-1]]):
            layers += [ResBlock(ch) for _ in range(c.num_res_blocks)]
            out = c.channels * mult
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, out, 3, padding=1)]
            ch = out
        layers += [nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):  # (B, D, h, w) -> (B, 3, H, W)
        return self.net(z)


class ImageTokenizer(nn.Module):
    def __init__(self, config: ImageTokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = build_quantizer(config)
        self.decoder = Decoder(config)
        self.pixel_decoder: PixelDiffusionDecoder | None = None  # a diffusion decoder after the codes, if trained

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def grid(self) -> tuple[int, int]:
        return (self.config.grid_size, self.config.grid_size)

    @property
    def scales(self) -> tuple[int, ...] | None:
        """The multi-scale quantizer's side lengths (codes are (B, sum s^2)); None for a single code grid."""
        return tuple(self.config.scales) if self.config.scales is not None else None

    @property
    def continuous(self) -> bool:
        """Tokens are latent vectors (B, h, w, latent_dim), not code ids (`quantizer: kl`)."""
        return self.config.quantizer in CONTINUOUS

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        q = self.quantizer(self.encoder(images))
        return self.decoder(q.z_q), q

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> codes (B, h, w) int64; (B, L) under `multiscale`; `kl`: latents (B, h, w, C)."""
        self._check_images(images)
        return self.quantizer.encode(self.encoder(images))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, decoder: str = "auto") -> torch.Tensor:
        """codes (B, h, w) ((B, L) under `multiscale`; `kl`: latents (B, h, w, C)) -> images (B, 3, H, W) in [-1, 1].

        decoder: "auto" (the diffusion decoder when the folder has one, else the VQ decoder), "vq" or
        "diffusion"."""
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if decoder == "diffusion" and self.pixel_decoder is None:
            raise ValueError("this image tokenizer has no diffusion decoder; train one with `unimodal decoder fit`")
        if self.pixel_decoder is not None and decoder != "vq":
            return self.pixel_decoder.decode(self, codes)
        return self.decoder(self.quantizer.lookup(codes)).clamp(-1, 1)

    def _check_images(self, images: torch.Tensor):
        r = self.config.resolution
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, r, r):
            raise ValueError(f"expected images of shape (B, 3, {r}, {r}), got {tuple(images.shape)}")

    # ---- persistence: config.json + model.safetensors
    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        # the tokenizer's weights alone: their digest names the codes
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("pixel_decoder.")}
        write_folder(directory, asdict(self.config), own)
        if self.pixel_decoder is not None:
            self.pixel_decoder.save_pretrained(directory / PIXEL_DECODER_FOLDER)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ImageTokenizer:
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory} is not an image tokenizer folder (missing {name}); "
                    "train one with `unimodal tokenizer fit --config ...`."
                )
        model = cls(load_config(directory))
        missing, unexpected = model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=False)
        # exports made before dead-code restart existed lack its step counters: they start at zero
        missing = [k for k in missing if not k.endswith("unused_steps")]
        if missing or unexpected:
            raise ValueError(
                f"{directory} does not match its config.json (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                "re-export it with `unimodal tokenizer fit`."
            )
        if (directory / PIXEL_DECODER_FOLDER).is_dir():
            model.pixel_decoder = PixelDiffusionDecoder.from_pretrained(directory / PIXEL_DECODER_FOLDER)
        return model.eval()


def load_config(directory: str | Path) -> ImageTokenizerConfig:
    return ImageTokenizerConfig(**json.loads((Path(directory) / CONFIG_FILE).read_text()))


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (measured on the [0, 1] scale). (B,) tensor."""
    mse = F.mse_loss((x.clamp(-1, 1) + 1) / 2, (y.clamp(-1, 1) + 1) / 2, reduction="none").flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) for images in [-1, 1], on the [0, 1] scale: a Gaussian
    window (`window` px, std `sigma`) per channel, 'valid' borders, mean over channels and
    positions. (B,) tensor; identical images give 1."""
    x, y = (x.clamp(-1, 1) + 1) / 2, (y.clamp(-1, 1) + 1) / 2
    c1, c2 = 0.01**2, 0.03**2
    g = torch.exp(-((torch.arange(window, dtype=x.dtype, device=x.device) - (window - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window)  # (C, 1, k, k), depthwise

    def blur(t):
        return F.conv2d(t, kernel, groups=x.shape[1])

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def token_statistics(tokenizer: ImageTokenizer, tokens: torch.Tensor) -> dict[str, float]:
    """Codebook usage and perplexity of encoded images; empty for continuous latents (nothing to count)."""
    if tokenizer.continuous:
        return {}
    return code_statistics(torch.bincount(tokens.flatten(), minlength=tokenizer.codebook_size))
