"""The quantizer family: one interface, round trips, gradients, Gumbel's hard limit, dead-code restart,
the entropy term (also across DDP ranks), and config errors."""

from __future__ import annotations

import pytest
import torch

from unimodal.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from unimodal.tokenizers.quantizers import QUANTIZERS, GumbelQuantizer, VectorQuantizer

SMALL = dict(resolution=16, channels=8, channel_mult=[2, 4], code_dim=16)


def small_config(quantizer: str, **extra) -> ImageTokenizerConfig:
    k = 8 * 8 * 4 * 4 if quantizer == "fsq" else 32
    return ImageTokenizerConfig(**SMALL, codebook_size=k, quantizer=quantizer, **extra)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_every_variant_round_trips_shapes_dtypes_and_save_load(quantizer, tmp_path):
    torch.manual_seed(0)
    tok = ImageTokenizer(small_config(quantizer))
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    tok.train()
    recon, q = tok(images)  # training pass (initialises data-dependent codebooks)
    assert recon.shape == images.shape and q.z_q.shape == (3, 16, 4, 4) and q.loss.dim() == 0
    assert q.codes.shape == (3, 4, 4) and q.codes.dtype == torch.int64
    tok.eval()
    codes = tok.encode(images)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < tok.codebook_size
    assert torch.equal(tok(images)[1].codes, codes)  # encode == the eval forward pass
    decoded = tok.decode(codes)
    assert decoded.shape == images.shape and decoded.dtype == torch.float32
    assert torch.allclose(decoded, tok(images)[0].clamp(-1, 1), atol=1e-5)  # decode(encode) == the forward pass
    loaded = ImageTokenizer.from_pretrained(tok.save_pretrained(tmp_path / quantizer))
    assert torch.equal(loaded.encode(images), codes) and torch.equal(loaded.decode(codes), decoded)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_gradients_reach_the_encoder(quantizer):
    torch.manual_seed(0)
    tok = ImageTokenizer(small_config(quantizer)).train()
    tok.quantizer.set_step(5)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    recon, q = tok(images)
    (torch.nn.functional.mse_loss(recon, images) + q.loss).backward()
    for p in (tok.encoder.net[0].weight, tok.encoder.net[-1].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_ema_codebook_moves_without_gradients():
    torch.manual_seed(0)
    tok = ImageTokenizer(small_config("ema")).train()
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    tok(images)
    before = tok.quantizer.codebook.weight.clone()
    tok(images)
    assert not tok.quantizer.codebook.weight.requires_grad
    assert not torch.allclose(before, tok.quantizer.codebook.weight)


def test_gumbel_at_low_temperature_is_the_hard_argmax():
    torch.manual_seed(0)
    quantizer = GumbelQuantizer(codebook_size=16, code_dim=8, temperature=(1.0, 1e-4), anneal_steps=10).train()
    z = torch.randn(2, 8, 4, 4)
    quantizer.set_step(10)  # end of the schedule
    assert quantizer.temperature == pytest.approx(1e-4)
    out = quantizer(z)
    assert torch.allclose(out.z_q, quantizer.lookup(out.codes), atol=1e-4)  # the relaxed sample is one code
    quantizer.set_step(0)
    hot = quantizer(z)
    assert not torch.allclose(hot.z_q, quantizer.lookup(hot.codes), atol=1e-4)  # at T=1 it is a mixture
    quantizer.eval()
    assert torch.equal(quantizer(z).codes, quantizer.to_logits(z).argmax(1))  # inference: argmax, no noise
    assert torch.equal(quantizer.encode(z), quantizer.to_logits(z).argmax(1))


def test_restart_revives_dead_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=16, code_dim=4, restart_window=2).train()
    with torch.no_grad():  # codes 8..15 sit far from the data, so they are never picked
        vq.codebook.weight.copy_(torch.cat([torch.randn(8, 4) * 0.1, torch.full((8, 4), 100.0)]))
    vq.initialized.fill_(True)
    z = torch.randn(2, 4, 8, 8) * 0.1
    restarted = [vq(z).stats["restarted_codes"] for _ in range(3)]
    assert restarted[0] == 0 and sum(restarted) >= 8  # dead after `restart_window` unused steps, then re-seeded
    used = torch.unique(vq.encode(z))
    assert (used >= 8).any(), "re-seeded codes should now win some positions"
    assert vq.codebook.weight.abs().max() < 10  # none left at the far-away init

    no_restart = VectorQuantizer(codebook_size=16, code_dim=4).train()
    no_restart.load_state_dict(vq.state_dict() | {"codebook.weight": torch.full((16, 4), 100.0)}, strict=False)
    assert no_restart(z).stats == {}


@pytest.mark.parametrize("quantizer", ["vq", "ema", "l2"])
def test_restart_during_training_keeps_autograd_intact(quantizer):
    torch.manual_seed(0)
    tok = ImageTokenizer(small_config(quantizer, restart_window=1)).train()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    restarted = 0.0
    for _ in range(3):  # 32 codes, 32 positions: some codes go unused every step and are re-seeded
        recon, q = tok(images)
        (torch.nn.functional.mse_loss(recon, images) + q.loss).backward()
        restarted += q.stats["restarted_codes"]
    assert restarted > 0


def test_entropy_term_spreads_a_collapsed_codebook():
    """Encoder outputs bunched in one cone use 6 of 16 random L2 codes; 60 Adam steps on the
    quantizer's loss (commitment + entropy) spread them over more codes, while without the entropy
    term the commitment loss keeps them where they are."""
    from unimodal.tokenizers.quantizers import L2Quantizer

    def codes_used(entropy_weight: float) -> tuple[int, int]:
        torch.manual_seed(0)
        q = L2Quantizer(16, code_dim=4, lookup_dim=4, entropy_weight=entropy_weight, entropy_temperature=0.1)
        q.train().initialized.fill_(True)  # keep the random codebook (no data init)
        with torch.no_grad():
            q.codebook.weight.copy_(torch.randn(16, 4))
        z = (torch.tensor([1.0, 0, 0, 0]).view(1, 4, 1, 1) + 0.2 * torch.randn(4, 4, 4, 4)).requires_grad_()
        before = q.encode(z).unique().numel()
        opt = torch.optim.Adam([z], lr=0.05)
        for _ in range(60):
            opt.zero_grad()
            q(z).loss.backward()
            opt.step()
        return before, q.encode(z.detach()).unique().numel()

    before, with_entropy = codes_used(1.0)
    assert codes_used(0.0) == (before, before)
    assert with_entropy >= before + 3


def _entropy_grads(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the L2 quantizer's entropy term w.r.t. its input and its codebook."""
    from unimodal.tokenizers.quantizers import L2Quantizer

    q = L2Quantizer(codebook.shape[0], code_dim=4, lookup_dim=4, entropy_temperature=0.1)
    with torch.no_grad():
        q.codebook.weight.copy_(codebook)
    z = z.clone().requires_grad_()
    q._entropy_loss(q._project(z).permute(0, 2, 3, 1).reshape(-1, 4)).backward()
    return z.grad, q.codebook.weight.grad


def _entropy_rank(rank: int, world: int, init: str, z: torch.Tensor, codebook: torch.Tensor, out: str):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        dz, dc = _entropy_grads(z.chunk(world)[rank], codebook)
        torch.distributed.all_reduce(dc)  # what DDP does with parameter gradients: average over ranks
        torch.save({"dz": dz, "dc": dc / world}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_entropy_term_under_ddp_matches_one_process_with_the_whole_batch(tmp_path):
    """The batch-entropy half of the term is not linear in the batch: two gloo ranks with half the batch
    each must all-reduce the mean assignment to get one process's gradients (codebook after DDP's
    averaging; each rank's input gradient = world x its rows' share of the full-batch gradient)."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    z = torch.randn(4, 4, 3, 3) + torch.tensor([2.0, 0, 0, 0]).view(1, 4, 1, 1)  # bunched: a far-from-flat batch
    codebook = torch.randn(16, 4)
    dz, dc = _entropy_grads(z, codebook)
    out = str(tmp_path / "grads")
    mp.spawn(_entropy_rank, args=(2, f"file://{tmp_path / 'store'}", z, codebook, out), nprocs=2)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    assert torch.allclose(ranks[0]["dc"], dc, atol=1e-6, rtol=1e-4), (ranks[0]["dc"] - dc).abs().max()
    for r, part in enumerate(dz.chunk(2)):
        assert torch.allclose(ranks[r]["dz"] / 2, part, atol=1e-6, rtol=1e-4), (ranks[r]["dz"] / 2 - part).abs().max()


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(quantizer="fsq", codebook_size=1000), "fsq_levels"),
        (dict(quantizer="gumbel", restart_window=10), "restart_window"),
        (dict(quantizer="nope"), "unknown quantizer"),
        (dict(gumbel_temperature=[0.1, 1.0]), "gumbel_temperature"),
        (dict(quantizer="fsq", codebook_size=1024, entropy_weight=0.1), "entropy_weight"),
        (dict(entropy_temperature=0.0), "entropy_temperature"),
    ],
)
def test_bad_quantizer_settings_are_clear_errors(extra, message):
    with pytest.raises(ValueError, match=message):
        ImageTokenizerConfig(**{**SMALL, **extra})
