"""The diffusion head: its config checks, identity start, guidance at scale 1, and - the test that can
fail - the head alone learning a 2-D distribution conditioned on a class vector, under both processes."""

import dataclasses

import pytest
import torch

from unimodal.diffusion import resolve_sampler
from unimodal.lm.diffloss import DiffLoss, DiffLossConfig

# class 0: two modes, weights 0.3 / 0.7; class 1: one correlated Gaussian
MODES = [(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), torch.tensor([0.3, 0.7]), 0.3)]
CLASS1_MEAN, CLASS1_COV = torch.tensor([0.0, 2.0]), torch.tensor([[0.5, 0.2], [0.2, 0.3]])


def toy_batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n points (n, 2) and their class vectors z (n, 2), classes equally likely."""
    label = torch.randint(0, 2, (n,), generator=g)
    centres, weights, std = MODES[0]
    mode = torch.multinomial(weights, n, replacement=True, generator=g)
    class0 = centres[mode] + std * torch.randn((n, 2), generator=g)
    class1 = CLASS1_MEAN + torch.randn((n, 2), generator=g) @ torch.linalg.cholesky(CLASS1_COV).T
    x = torch.where(label[:, None] == 0, class0, class1)
    return x, torch.nn.functional.one_hot(label, 2).float()


def test_config_refuses_a_sampler_of_the_other_process():
    with pytest.raises(ValueError, match="sampler"):
        DiffLossConfig(process="flow", sampler="ddim")
    with pytest.raises(ValueError, match="process"):
        DiffLossConfig(process="score")
    assert resolve_sampler("flow", DiffLossConfig(process="flow").sampler) == "euler"
    assert resolve_sampler("ddpm", DiffLossConfig().sampler) == "ddpm"
    # the default config with only its process changed (a command-line `--model.head.process flow`) is valid
    changed = dataclasses.replace(DiffLossConfig(), process="flow")
    assert DiffLoss(changed).sample(torch.zeros(2, changed.cond_dim), generator=torch.Generator()).shape == (2, 16)


def test_an_untrained_head_predicts_zero():
    head = DiffLoss(DiffLossConfig(token_dim=4, cond_dim=8, width=32, depth=2))
    out = head.net(torch.randn(5, 4), torch.rand(5) * 1000, torch.randn(5, 8))
    assert torch.equal(out, torch.zeros(5, 4))


@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_guidance_at_scale_one_is_the_conditional_model(process):
    torch.manual_seed(0)
    head = DiffLoss(DiffLossConfig(token_dim=3, cond_dim=6, width=32, depth=2, process=process, sample_steps=20))
    for p in head.parameters():  # away from the zero start, so conditions matter
        torch.nn.init.normal_(p, std=0.3)
    z, z_uncond = torch.randn(7, 6), torch.randn(7, 6)
    plain = head.sample(z, generator=torch.Generator().manual_seed(3))
    guided = head.sample(z, cfg_scale=1.0, z_uncond=z_uncond, generator=torch.Generator().manual_seed(3))
    unguided_uncond = head.sample(z_uncond, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(plain, guided, atol=1e-5)
    assert not torch.allclose(plain, unguided_uncond, atol=1e-2)  # the condition does change the samples
    strong = head.sample(z, cfg_scale=3.0, z_uncond=z_uncond, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(plain, strong, atol=1e-2)


def test_masked_tokens_do_not_count_in_the_loss():
    head = DiffLoss(DiffLossConfig(token_dim=2, cond_dim=2, width=16, depth=1))
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    target, z = torch.randn(6, 2), torch.randn(6, 2)
    mask = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)
    head.loss(target, z, mask, generator=torch.Generator().manual_seed(0)).backward()
    grads = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    changed = target.clone()
    changed[3:] += 100.0  # masked rows: their values must not matter
    head.loss(changed, z, mask, generator=torch.Generator().manual_seed(0)).backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(grads, head.parameters()))


@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_the_loss_draws_its_steps_and_noise_from_the_given_generator(process):
    head = DiffLoss(DiffLossConfig(token_dim=2, cond_dim=2, width=16, depth=1, process=process))
    target, z = torch.randn(8, 2), torch.randn(8, 2)
    first = head.loss(target, z, generator=torch.Generator().manual_seed(5))
    torch.randn(100)  # the global generator moves; the given one decides
    again = head.loss(target, z, generator=torch.Generator().manual_seed(5))
    other = head.loss(target, z, generator=torch.Generator().manual_seed(6))
    assert first == again
    assert first != other


def mode_weights(x: torch.Tensor) -> torch.Tensor:
    centres = MODES[0][0]
    nearest = torch.cdist(x, centres).argmin(1)
    return torch.bincount(nearest, minlength=2).float() / len(x)


@pytest.mark.slow  # about 15 s each on one shared core
@pytest.mark.parametrize("process, steps", [("ddpm", 50), ("flow", 25)])
def test_the_head_learns_a_conditional_mixture(process, steps):
    """600 steps of training on one core: per class, the samples' mode weights, means and
    covariances come within tolerance of the data's."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    head = DiffLoss(DiffLossConfig(token_dim=2, cond_dim=2, width=64, depth=2, process=process, sample_steps=steps))
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=600, pct_start=0.05)
    for _ in range(600):
        x, z = toy_batch(256, g)
        loss = head.loss(x, z)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    n = 4000
    class0 = head.sample(torch.tensor([[1.0, 0.0]]).expand(n, 2), generator=g)
    class1 = head.sample(torch.tensor([[0.0, 1.0]]).expand(n, 2), generator=g)
    assert torch.allclose(mode_weights(class0), MODES[0][1], atol=0.06), mode_weights(class0)
    centres = MODES[0][0]
    for k in range(2):
        near = class0[torch.cdist(class0, centres).argmin(1) == k]
        assert torch.allclose(near.mean(0), centres[k], atol=0.12), (k, near.mean(0))
        assert torch.allclose(near.std(0), torch.full((2,), 0.3), atol=0.1), (k, near.std(0))
    assert torch.allclose(class1.mean(0), CLASS1_MEAN, atol=0.1), class1.mean(0)
    assert torch.allclose(torch.cov(class1.T), CLASS1_COV, atol=0.1), torch.cov(class1.T)
