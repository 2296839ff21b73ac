"""The image tokenizer: shapes and dtypes, codes round-tripping through the codebook, save/load, SSIM,
and a trained tokenizer reconstructing better than an untrained one."""

import torch

from unimodal.data.images import images_to_tensor
from unimodal.data.shapes import ShapesConfig, shapes_dataset
from unimodal.tokenizers.image import ImageTokenizer, ImageTokenizerConfig, psnr, ssim


def test_image_tokenizer_shapes_and_dtypes():
    cfg = ImageTokenizerConfig(resolution=32, channels=8, codebook_size=16)
    tok = ImageTokenizer(cfg).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    codes = tok.encode(x)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < 16
    y = tok.decode(codes)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1


def test_codes_round_trip_through_the_codebook():
    """Quantizing a code's own embedding gives the code back: decode's input re-encodes exactly."""
    tok = ImageTokenizer(ImageTokenizerConfig(channels=8, codebook_size=32)).eval()
    codes = torch.randint(0, 32, (4, 8, 8))
    assert torch.equal(tok.quantizer(tok.quantizer.lookup(codes)).codes, codes)


def test_image_tokenizer_save_load_identical(tmp_path):
    tok = ImageTokenizer(ImageTokenizerConfig(channels=8, codebook_size=16)).eval()
    tok.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    again = ImageTokenizer.from_pretrained(tmp_path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(tok.encode(x), again.encode(x))
    assert torch.equal(tok.decode(tok.encode(x)), again.decode(again.encode(x)))


def test_trained_tokenizer_reconstructs_better_than_untrained(trained, hf_cache):
    tok = ImageTokenizer.from_pretrained(trained["tokenizer"])
    fresh = ImageTokenizer(tok.config).eval()
    ds = shapes_dataset(ShapesConfig(train_size=256, test_size=64, heldout_size=32), cache_dir=str(hf_cache))
    x = images_to_tensor(ds["test"]["image"][:32], 32)
    trained_psnr = psnr(tok.decode(tok.encode(x)), x).mean()
    fresh_psnr = psnr(fresh.decode(fresh.encode(x)), x).mean()
    assert trained_psnr > fresh_psnr + 3


def test_ssim_sanity():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    slightly = ssim(x, x + 0.05 * torch.randn_like(x))
    very = ssim(x, x + 0.5 * torch.randn_like(x))
    assert (very < slightly).all() and (slightly < 1).all()
    assert torch.allclose(ssim(x, x.flip(0)), ssim(x.flip(0), x), atol=1e-6)  # symmetric
