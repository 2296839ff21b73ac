"""The noise processes: the cosine schedule and its respacing against their closed forms, and every
sampler reaching the data distribution when given the exact denoiser of Gaussian data."""

import pytest
import torch

from unimodal.diffusion import (
    FlowMatching,
    GaussianDiffusion,
    cosine_alpha_bar,
    cosine_betas,
    respaced_betas,
    respaced_steps,
)


def test_cosine_schedule_matches_its_closed_form():
    betas = cosine_betas(1000)
    acp = torch.cumprod(1 - betas, 0)
    closed = cosine_alpha_bar(torch.arange(1, 1001, dtype=torch.float64), 1000)  # alpha_bar after step s
    capped = betas >= 0.999
    assert capped.sum() == 1 and capped[-1]  # only the last step reaches the cap
    assert torch.allclose(acp[:-1], closed[:-1], rtol=1e-9, atol=1e-12)
    assert (betas[1:] >= betas[:-1]).all() and betas[0] > 0  # noise grows along the chain
    assert acp[0] > 0.9999 and acp[-1] < 1e-6


@pytest.mark.parametrize("steps", [1, 10, 100, 1000])
def test_respaced_chain_keeps_alpha_bar_at_the_kept_steps(steps):
    acp = GaussianDiffusion(1000).alphas_cumprod
    kept = respaced_steps(1000, steps)
    assert len(kept) == steps and kept[-1] == 999 and (kept[1:] > kept[:-1]).all()
    if steps > 1:
        assert kept[0] == 0
    betas = respaced_betas(acp, kept)
    assert torch.allclose(torch.cumprod(1 - betas, 0), acp[kept], rtol=1e-10)
    previous = torch.cat([torch.ones(1, dtype=acp.dtype), acp[kept][:-1]])
    assert torch.allclose(betas, 1 - acp[kept] / previous)
    if steps == 1000:
        assert torch.allclose(betas, GaussianDiffusion(1000).betas)  # no respacing: the original chain


def test_respacing_refuses_impossible_lengths():
    with pytest.raises(ValueError, match="steps"):
        respaced_steps(1000, 0)
    with pytest.raises(ValueError, match="steps"):
        respaced_steps(100, 101)


MU, STD = torch.tensor([1.5, -0.5]), torch.tensor([0.5, 1.2])  # Gaussian data, per channel


def exact_noise_predictor(process: GaussianDiffusion):
    """E[noise | x_t] for x0 ~ N(MU, diag(STD^2)): the optimum of the DDPM loss."""

    def net(x, t, z):
        a = process.alphas_cumprod[t.long()].to(x.dtype)[:, None]
        var = a * STD**2 + 1 - a
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / var

    return net


def exact_velocity(x, t, z):
    """E[noise - x0 | x_t] for the same data under the straight path x_t = (1 - t) x0 + t noise."""
    t = (t / FlowMatching.time_scale)[:, None]
    var = (1 - t) ** 2 * STD**2 + t**2
    centred = x - (1 - t) * MU
    return t / var * centred - (MU + (1 - t) * STD**2 / var * centred)


@pytest.mark.parametrize(
    "process, sampler, steps",
    [(GaussianDiffusion(), "ddpm", 100), (GaussianDiffusion(), "ddim", 100), (FlowMatching(), "euler", 50)],
)
def test_samplers_reach_the_data_distribution_with_the_exact_denoiser(process, sampler, steps):
    g = torch.Generator().manual_seed(0)
    net = exact_noise_predictor(process) if process.name == "ddpm" else exact_velocity
    noise = torch.randn((20000, 2), dtype=torch.float64, generator=g)
    x = process.sample(net, None, noise, steps, 1.0, sampler, generator=g)
    assert torch.allclose(x.mean(0), MU.double(), atol=0.03), x.mean(0)
    assert torch.allclose(x.std(0), STD.double(), rtol=0.04), x.std(0)


def test_temperature_narrows_the_samples():
    """Below 1 the samplers inject less noise: the samples concentrate around the data's mean."""
    process = GaussianDiffusion()
    net = exact_noise_predictor(process)
    noise = torch.randn((8000, 2), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for sampler in ("ddpm", "ddim"):
        hot = process.sample(net, None, noise, 50, 1.0, sampler, generator=torch.Generator().manual_seed(2))
        cold = process.sample(net, None, noise, 50, 0.5, sampler, generator=torch.Generator().manual_seed(2))
        assert (cold.std(0) < 0.8 * hot.std(0)).all(), sampler
        assert torch.allclose(cold.mean(0), MU.double(), atol=0.05)
    flow_cold = FlowMatching().sample(exact_velocity, None, noise, 50, 0.5)
    assert torch.allclose(flow_cold.std(0), 0.5 * STD.double(), rtol=0.06)  # a linear flow scales the noise


def test_flow_matching_training_example_is_the_straight_path():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    x_t, t, target = FlowMatching().training_example(x0, noise, generator=g)
    s = (t / FlowMatching.time_scale)[:, None]
    assert torch.allclose(x_t, (1 - s) * x0 + s * noise, atol=1e-5) and torch.equal(target, noise - x0)
    assert 0 <= float(t.min()) < 100 and 900 < float(t.max()) < 1000  # the denoiser sees t * 1000
