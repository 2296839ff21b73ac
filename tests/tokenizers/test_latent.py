"""The continuous image tokenizer (`quantizer: kl`): latent shapes through encode and decode, a finite
KL term, a deterministic encode, the latent scale it learns and saves, and the stage-1 module's metrics."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from unimodal.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from unimodal.training.modules import TokenizerModule

KL = ImageTokenizerConfig(resolution=16, channels=8, channel_mult=[2, 4], code_dim=16, quantizer="kl", latent_dim=6)


def test_latents_round_trip_shapes():
    tok = ImageTokenizer(KL).eval()
    assert tok.continuous and not ImageTokenizer(ImageTokenizerConfig(channels=8)).continuous
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    latents = tok.encode(x)
    assert latents.shape == (3, 4, 4, 6) and latents.dtype == torch.float32
    y = tok.decode(latents)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1


def test_encode_is_the_deterministic_mean_and_training_samples():
    torch.manual_seed(0)
    tok = ImageTokenizer(KL)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    tok.eval()
    assert torch.equal(tok.encode(x), tok.encode(x))
    recon, q = tok(x)  # eval forward: the mean, the same latents encode gives
    assert torch.allclose(q.codes, tok.encode(x)) and torch.allclose(recon.clamp(-1, 1), tok.decode(q.codes), atol=1e-6)
    tok.train()
    (_, a), (_, b) = tok(x), tok(x)
    assert not torch.equal(a.z_q, b.z_q)  # a fresh sample of the posterior each time


def test_kl_term_is_finite_nonnegative_and_weighted():
    torch.manual_seed(0)
    tok = ImageTokenizer(KL).train()
    _, q = tok(torch.rand(4, 3, 16, 16) * 2 - 1)
    assert torch.isfinite(q.loss) and q.stats["kl"] >= 0
    assert torch.isclose(q.loss, torch.tensor(KL.kl_weight * q.stats["kl"]), rtol=1e-5)
    moments = tok.quantizer.to_moments  # mean 0, log-variance 0: the posterior is the prior, no KL
    torch.nn.init.zeros_(moments.weight)
    torch.nn.init.zeros_(moments.bias)
    _, q = tok(torch.rand(2, 3, 16, 16))
    assert q.stats["kl"] == 0.0


def test_latent_scale_is_learned_and_saved(tmp_path):
    """Training tracks the posterior means' std, so stage 2 sees latents of about unit scale; the scale
    travels in model.safetensors."""
    torch.manual_seed(0)
    tok = ImageTokenizer(KL).train()
    x = torch.rand(16, 3, 16, 16) * 2 - 1
    for _ in range(3):
        tok(x)
    tok.eval()
    assert float(tok.quantizer.latent_std) != 1.0
    assert abs(float(tok.encode(x).std()) - 1) < 0.1
    tok.save_pretrained(tmp_path)
    again = ImageTokenizer.from_pretrained(tmp_path)
    assert torch.equal(again.quantizer.latent_std, tok.quantizer.latent_std)
    assert torch.equal(again.encode(x), tok.encode(x))
    assert torch.equal(again.decode(again.encode(x)), tok.decode(tok.encode(x)))


def test_unknown_quantizer_lists_the_continuous_option():
    with pytest.raises(ValueError, match="'kl'"):
        ImageTokenizerConfig(quantizer="vae")


def test_stage1_module_reports_psnr_ssim_and_kl_for_a_continuous_latent():
    torch.manual_seed(0)
    module = TokenizerModule(KL, warmup_steps=1)
    images = torch.rand(32, 3, 16, 16) * 2 - 1
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=4, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, DataLoader(images, batch_size=8), DataLoader(images[:16], batch_size=8))
    m = trainer.callback_metrics
    assert {"val/psnr", "val/ssim", "val/kl", "train/kl", "train/latent_std"} <= set(m)
    assert "val/codebook_usage" not in m and torch.isfinite(m["val/kl"])
