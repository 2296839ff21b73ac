"""VQGAN-style adversarial loss for the image tokenizer: a PatchGAN discriminator, hinge losses,
and the adaptive weight that balances the adversarial gradient against the reconstruction one.

No perceptual (LPIPS) term: it needs a pretrained network, and this project downloads no weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / VQGAN): strided convs -> one real/fake logit per receptive-field patch.

    (B, 3, H, W) -> (B, 1, H/4 - 1, W/4 - 1) logits for `layers=2`.
    """

    def __init__(self, channels: int = 32, layers: int = 2):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers):
            out = channels * 2**i
            blocks += [nn.Conv2d(ch, out, 4, stride=2, padding=1), nn.GroupNorm(8, out), nn.LeakyReLU(0.2)]
            ch = out
        blocks += [nn.Conv2d(ch, 1, 4, stride=1, padding=1)]
        self.net = nn.Sequential(*blocks)

    def forward(self, x):
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def generator_adv_loss(disc: PatchDiscriminator, fake: torch.Tensor) -> torch.Tensor:
    """-D(fake), with the discriminator's parameters frozen for this term only, so one optimizer
    step can train the generator on it and the discriminator on `hinge_d_loss` at once."""
    frozen = {k: v.detach() for k, v in disc.named_parameters()}
    return -functional_call(disc, frozen, (fake,)).mean()


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor, max_weight=1e4):
    """VQGAN's lambda = |grad rec| / |grad adv| at the decoder's last layer (no gradient through it)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0, max_weight).detach()
