"""The diffusion decoder after the tokens: which decoder `decode` uses, persistence beside the tokenizer
(whose own weights, and so the digest that names its codes, do not change), the noise processes on
images, attaching to a bundle, and that training it restores detail the VQ decoder loses."""

import dataclasses
import shutil

import pytest
import torch

from unimodal.diffusion import FlowMatching, GaussianDiffusion
from unimodal.generation.bundle import Bundle
from unimodal.generation.sampling import SamplingParams
from unimodal.tokenizers.image import WEIGHTS_FILE, ImageTokenizer, ImageTokenizerConfig, psnr
from unimodal.tokenizers.pixel_diffusion import FOLDER, PixelDiffusionConfig, PixelDiffusionDecoder
from unimodal.training.decoder import attach

TOK = ImageTokenizerConfig(resolution=16, channels=8, channel_mult=[2, 4], code_dim=8, codebook_size=16)
SMALL = PixelDiffusionConfig(channels=16, channel_mult=[1, 2], sampling_steps=4)


def _with_decoder(config=SMALL, seed=0):
    torch.manual_seed(seed)
    tok = ImageTokenizer(TOK).eval()
    tok.pixel_decoder = PixelDiffusionDecoder(config, TOK.code_dim, TOK.resolution).eval()
    tok.pixel_decoder.residual_scale.fill_(0.5)
    for p in tok.pixel_decoder.net.out.parameters():  # out of its zero start: samples depend on the net
        torch.nn.init.normal_(p, std=0.05)
    return tok


def test_decode_picks_the_decoder():
    tok = _with_decoder()
    codes = tok.encode(torch.rand(3, 3, 16, 16) * 2 - 1)
    vq = tok.decoder(tok.quantizer.lookup(codes)).clamp(-1, 1)
    assert torch.equal(tok.decode(codes, "vq"), vq)
    torch.manual_seed(1)
    auto = tok.decode(codes)
    torch.manual_seed(1)
    assert torch.equal(auto, tok.decode(codes, "diffusion"))
    assert not torch.allclose(auto, vq) and auto.shape == vq.shape and auto.abs().max() <= 1
    with pytest.raises(ValueError, match="no diffusion decoder"):
        ImageTokenizer(TOK).decode(codes, "diffusion")
    with pytest.raises(ValueError, match="decoder must be"):
        tok.decode(codes, "pixels")


@pytest.mark.parametrize("process", ["flow", "ddpm"])
def test_saved_beside_the_tokenizer_and_loaded_identically(tmp_path, process):
    tok = _with_decoder(PixelDiffusionConfig(channels=16, channel_mult=[1, 2], sampling_steps=3, process=process))
    tok.save_pretrained(tmp_path / "with")
    tok_plain = ImageTokenizer(TOK)
    tok_plain.load_state_dict({k: v for k, v in tok.state_dict().items() if not k.startswith("pixel_decoder.")})
    tok_plain.save_pretrained(tmp_path / "without")
    # the tokenizer's own weights file is the same with or without a decoder: extracted codes stay valid
    assert (tmp_path / "with" / WEIGHTS_FILE).read_bytes() == (tmp_path / "without" / WEIGHTS_FILE).read_bytes()
    assert not (tmp_path / "without" / FOLDER).exists()
    loaded = ImageTokenizer.from_pretrained(tmp_path / "with")
    assert loaded.pixel_decoder is not None and loaded.pixel_decoder.config == tok.pixel_decoder.config
    assert float(loaded.pixel_decoder.residual_scale) == 0.5
    codes = tok.encode(torch.rand(2, 3, 16, 16) * 2 - 1)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = tok.pixel_decoder.decode(tok, codes, generator=g1)
    assert torch.equal(a, loaded.pixel_decoder.decode(loaded, codes, generator=g2))


def test_config_is_checked():
    with pytest.raises(ValueError, match="process"):
        PixelDiffusionConfig(process="score")
    with pytest.raises(ValueError, match="must be one of"):
        PixelDiffusionConfig(process="flow", sampler="ddim")
    # the default config with another process (what a command-line override of `process` does) stays valid
    assert dataclasses.replace(PixelDiffusionConfig(), process="ddpm").sampler is None
    with pytest.raises(ValueError, match="halve"):
        PixelDiffusionDecoder(PixelDiffusionConfig(channel_mult=[1, 2, 2, 2, 2, 2]), 8, 16)


def test_processes_broadcast_over_images():
    """training_example on images (N, C, H, W) is the per-example formula, each image at its own step."""
    x0, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    ddpm = GaussianDiffusion()
    torch.manual_seed(0)
    x_t, t, target = ddpm.training_example(x0, noise)
    ab = ddpm.alphas_cumprod[t.long()].float()
    for i in range(4):
        assert torch.allclose(x_t[i], ab[i].sqrt() * x0[i] + (1 - ab[i]).sqrt() * noise[i], atol=1e-6)
    assert torch.equal(target, noise)
    x_t, t, target = FlowMatching().training_example(x0, noise)
    s = t / 1000
    for i in range(4):
        assert torch.allclose(x_t[i], (1 - s[i]) * x0[i] + s[i] * noise[i], atol=1e-6)
    assert torch.allclose(target, noise - x0)


def test_attach_to_a_bundle_with_the_same_tokenizer(tiny_bundle, tmp_path):
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle_dir)
    tok = Bundle.load(bundle_dir).image_tokenizer
    tok.pixel_decoder = PixelDiffusionDecoder(SMALL, tok.config.code_dim, tok.config.resolution)
    tok.pixel_decoder.residual_scale.fill_(0.5)
    torch.nn.init.normal_(tok.pixel_decoder.net.out[-1].weight, std=0.05)
    tok.save_pretrained(tmp_path / "decoder_export")
    other = ImageTokenizer(tok.config)  # freshly initialised: other weights
    other.pixel_decoder = tok.pixel_decoder
    other.save_pretrained(tmp_path / "other_export")
    with pytest.raises(ValueError, match="another image tokenizer"):
        attach(bundle_dir, tmp_path / "other_export")
    with pytest.raises(FileNotFoundError, match="pixel_decoder"):
        attach(bundle_dir, tiny_bundle / "image_tokenizer")

    attach(bundle_dir, tmp_path / "decoder_export")
    with_decoder = Bundle.load(bundle_dir)
    assert with_decoder.image_tokenizer.pixel_decoder is not None
    params = SamplingParams(seed=5)
    a = with_decoder.generate(["a red circle at the top left"], params)
    b = Bundle.load(bundle_dir).generate(["a red circle at the top left"], params)
    vq = with_decoder.generate(["a red circle at the top left"], SamplingParams(seed=5, decoder="vq"))
    plain = Bundle.load(tiny_bundle).generate(["a red circle at the top left"], params)
    assert torch.equal(a, b)  # saved + loaded: identical samples for a seed
    assert torch.equal(vq, plain)  # the same codes through the VQ decoder
    assert not torch.allclose(a, vq)


@pytest.mark.slow
def test_training_restores_detail_the_vq_decoder_loses():
    """An untrained tokenizer's VQ decoder returns mush; a flow decoder trained on eight images' codes brings
    them back far closer (the conditioning identifies each image). (The processes themselves learn a known
    distribution in tests/lm/test_diffloss.py.)"""
    torch.manual_seed(0)
    tok = ImageTokenizer(TOK).eval().requires_grad_(False)
    images = torch.nn.functional.avg_pool2d(torch.rand(8, 3, 16, 16) * 2 - 1, 3, 1, 1)  # some spatial structure
    codes = tok.encode(images)
    vq_psnr = float(psnr(tok.decode(codes, "vq"), images).mean())
    dec = PixelDiffusionDecoder(PixelDiffusionConfig(channels=32, channel_mult=[1, 2], sampling_steps=10), 8, 16)
    opt = torch.optim.AdamW(dec.parameters(), lr=2e-3)
    for _ in range(150):  # 8 dB above the VQ decoder's PSNR here (14 dB after 250 steps)
        loss = dec.loss(tok, images)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = dec.eval().decode(tok, codes, generator=torch.Generator().manual_seed(0))
    gain = float(psnr(out, images).mean()) - vq_psnr
    assert gain > 3.0, (gain, vq_psnr)


def test_compare_decoders_scores_both_on_the_same_codes(tmp_path):
    from unimodal.evaluation.decoders import compare_decoders, format_table

    tok = _with_decoder()
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    features = lambda x: x.flatten(1)[:, :10]  # noqa: E731 (a toy feature space)
    result = compare_decoders(tok, images, features, reference=images.flip(0), steps=(1, 3), batch_size=4,
                              grid_path=tmp_path / "grid.png")  # fmt: skip
    rows = result["rows"]
    assert [(r["decoder"], r["steps"]) for r in rows] == [("vq", None), ("diffusion", 1), ("diffusion", 3)]
    vq = tok.decode(tok.encode(images), "vq")
    assert abs(rows[0]["psnr"] - float(psnr(vq, images).mean())) < 1e-4
    assert rows[1]["psnr"] != rows[2]["psnr"] and all(r["fd"] >= 0 for r in rows)
    assert result["fd_other_real_images"] < 1e-3  # the same images in another order: the same distribution
    assert result["parameters"]["diffusion_decoder"] == sum(p.numel() for p in tok.pixel_decoder.parameters())
    assert (tmp_path / "grid.png").is_file() and "| diffusion | 3 |" in format_table(result)
    with pytest.raises(ValueError, match="no diffusion decoder"):
        compare_decoders(ImageTokenizer(TOK), images, features)


def test_an_untrained_decoder_is_refused():
    tok = ImageTokenizer(TOK).eval()
    tok.pixel_decoder = PixelDiffusionDecoder(SMALL, TOK.code_dim, TOK.resolution)
    with pytest.raises(ValueError, match="never trained"):
        tok.decode(tok.encode(torch.rand(1, 3, 16, 16)))
