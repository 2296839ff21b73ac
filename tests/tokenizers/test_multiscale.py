"""The multi-scale residual quantizer: config checks, per-scale code shapes, decoding equal to the decoder
of the summed scale contributions, the residual loop, restart and usage statistics, and a stage-1 fit."""

import csv

import pytest
import torch
import torch.nn.functional as F

from unimodal.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from unimodal.tokenizers.multiscale import (
    join_scales,
    reachable_usage,
    scale_counts,
    scale_usage,
    split_scales,
    warn_low_usage,
)

SCALES = [1, 2, 4, 8]


def _config(**kw) -> ImageTokenizerConfig:
    base = dict(resolution=32, channels=8, code_dim=8, codebook_size=32, quantizer="multiscale", scales=SCALES)
    return ImageTokenizerConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(scales=None), "needs scales"),
        (dict(scales=[1, 2, 4]), "last scale must be the latent grid 8"),
        (dict(scales=[1, 4, 2, 8]), "strictly ascending"),
        (dict(scales=[0, 8]), "positive"),
        (dict(scale_codebook="fsq"), "scale_codebook"),
        (dict(quantizer="vq"), "scales applies to quantizer: multiscale"),
        (dict(phi_mix=1.5), "phi_mix"),
    ],
)
def test_config_refuses_bad_scales(kw, message):
    with pytest.raises(ValueError, match=message):
        _config(**kw)


@pytest.mark.parametrize("codebook", ["vq", "ema", "l2"])
def test_round_trip_shapes(codebook):
    tok = ImageTokenizer(_config(scale_codebook=codebook)).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    codes = tok.encode(x)
    assert codes.shape == (3, 1 + 4 + 16 + 64) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 32
    assert [m.shape for m in split_scales(codes, tok.scales)] == [(3, s, s) for s in SCALES]
    assert torch.equal(join_scales(split_scales(codes, tok.scales)), codes)
    y = tok.decode(codes)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    if codebook != "ema":  # (ema moves the codebook during the training forward)
        _, q = tok.train()(x)  # the training forward picks the same codes as encode (after its first-batch init)
        assert torch.equal(tok.eval().encode(x), q.codes)


def test_decode_is_the_decoder_of_the_summed_scale_contributions():
    """Written out here from the definition: each scale's codes -> codebook vectors -> bicubic upsampling to
    the grid -> its phi (shared by neighbouring scales) -> summed -> decoder."""
    torch.manual_seed(0)
    tok = ImageTokenizer(_config(phi_count=2)).eval()
    quantizer = tok.quantizer
    codes = torch.randint(0, 32, (2, quantizer.tokens))
    f_hat = torch.zeros(2, 8, 8, 8)
    for k, c in enumerate(split_scales(codes, tok.scales)):
        e = quantizer.codebook.codebook.weight[c].permute(0, 3, 1, 2)  # (B, D, s, s)
        if c.shape[-1] != 8:
            e = F.interpolate(e, size=(8, 8), mode="bicubic", align_corners=False)
        phi = quantizer.phis[0 if k < 2 else 1]  # 4 scales, 2 phis: scales 0, 1 -> first; 2, 3 -> second
        f_hat += 0.5 * e + 0.5 * phi.conv(e)
    expected = tok.decoder(f_hat).clamp(-1, 1)
    assert torch.allclose(tok.decode(codes), expected, atol=1e-5)


def test_encode_is_the_residual_loop():
    """Each scale quantizes what the coarser scales left: the codes of scale k are the nearest codes of the
    area-downsampled residual after subtracting scales < k; the full sum is the quantizer's forward z_q."""
    torch.manual_seed(1)
    tok = ImageTokenizer(_config()).eval()
    quantizer = tok.quantizer
    z = torch.randn(2, 8, 8, 8)
    codes = split_scales(quantizer.encode(z), tok.scales)
    residual = z.clone()
    for k, s in enumerate(SCALES):
        down = F.adaptive_avg_pool2d(residual, s)
        assert torch.equal(quantizer.codebook.encode(down), codes[k])
        residual = residual - quantizer.contribution(quantizer.codebook.lookup(codes[k]), k, (8, 8))
    assert torch.allclose(quantizer(z).z_q, z - residual, atol=1e-5)  # eval forward: z_q = f_hat
    assert torch.allclose(quantizer.lookup(join_scales(codes)), z - residual, atol=1e-5)


def test_gradients_reach_encoder_codebook_and_phi():
    tok = ImageTokenizer(_config()).train()
    recon, q = tok(torch.rand(4, 3, 32, 32) * 2 - 1)
    (F.mse_loss(recon, torch.zeros_like(recon)) + q.loss).backward()
    assert tok.encoder.net[0].weight.grad.abs().sum() > 0
    assert tok.quantizer.codebook.codebook.weight.grad.abs().sum() > 0
    assert all(phi.conv.weight.grad.abs().sum() > 0 for phi in tok.quantizer.phis)
    assert {f"usage_s{k}" for k in range(4)} <= set(q.stats)


@pytest.mark.parametrize("codebook", ["vq", "l2"])
def test_dead_codes_restart_once_per_step(codebook):
    """Restart counts steps, not scales, and runs before any lookup (l2's normalisation keeps its graph)."""
    torch.manual_seed(0)
    tok = ImageTokenizer(_config(scale_codebook=codebook, restart_window=2, codebook_size=256)).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    restarted = []
    for step in range(4):
        tok.quantizer.set_step(step)
        recon, q = tok(x)
        (recon.square().mean() + q.loss).backward()  # in-place re-seeding must not break autograd
        restarted.append(q.stats.get("restarted_codes", 0.0))
    # 2 images use at most 2 * 85 = 170 of 256 codes: the unused ones die after two steps, the first step
    # counted at the start of the second
    assert restarted[0] == 0 and restarted[1] == 0 and restarted[2] > 0


def test_usage_statistics():
    codes = torch.tensor([[3, 0, 1, 2, 3], [3, 1, 1, 1, 1]])  # scales (1, 2): scale 0 always code 3
    counts = scale_counts(codes, (1, 2), 8)
    assert counts.tolist() == [[0, 0, 0, 2, 0, 0, 0, 0], [1, 5, 1, 1, 0, 0, 0, 0]]
    usage = scale_usage(counts)
    assert usage["usage_s0"] == 0.5  # one code over min(K=8, 2 positions)
    assert usage["usage_s1"] == 4 / 8  # four codes over min(8, 8 positions)
    assert reachable_usage(torch.tensor([5, 0, 0, 0])) == 1 / 4
    assert usage["perplexity_s0"] == pytest.approx(1.0)


def test_low_usage_is_warned_per_scale(caplog):
    counts = torch.tensor([[64, 0, 0, 0], [16, 16, 16, 16]])
    assert warn_low_usage(counts, (1, 2), threshold=0.5) == [0]
    assert "scale 0 (1x1)" in caplog.text and "scale 1" not in caplog.text


def test_save_load_identical(tmp_path):
    tok = ImageTokenizer(_config(scale_codebook="l2", lookup_dim=4)).eval()
    tok.save_pretrained(tmp_path)
    again = ImageTokenizer.from_pretrained(tmp_path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert again.scales == (1, 2, 4, 8)
    assert torch.equal(tok.encode(x), again.encode(x))
    assert torch.equal(tok.decode(tok.encode(x)), again.decode(again.encode(x)))


@pytest.mark.slow
def test_stage1_fit_with_multiscale_logs_per_scale_usage(tmp_path, hf_cache):
    from tests.conftest import fit_tokenizer

    extra = ["--model.model.quantizer", "multiscale", "--model.model.scales", "[1, 2, 4, 8]",
             "--model.model.restart_window", "20"]  # fmt: skip
    export = fit_tokenizer(tmp_path, hf_cache, steps=20, name="ms", extra=extra)
    tok = ImageTokenizer.from_pretrained(export)
    assert tok.scales == (1, 2, 4, 8) and tok.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 85)
    rows = list(csv.DictReader(open(next((tmp_path / "ms").rglob("metrics.csv")))))
    keys = set().union(*rows)
    assert {"val/usage_s0", "val/usage_s3", "train/usage_s3", "val/psnr"} <= keys
