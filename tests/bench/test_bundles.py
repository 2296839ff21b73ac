"""`bench bundles`: one row per way of drawing an image (VQ decoder; a diffusion decoder or head at each number of
steps) and batch size, with the sizes of the parts."""

import json
import shutil

import torch

from unimodal.bench import bundles as bench_bundles
from unimodal.tokenizers.image import ImageTokenizer
from unimodal.tokenizers.pixel_diffusion import PixelDiffusionConfig, PixelDiffusionDecoder


def test_bundles_bench_times_each_decoder_and_step_count(tiny_bundle, tmp_path):
    with_decoder = tmp_path / "dec" / "export"
    shutil.copytree(tiny_bundle, with_decoder)
    tok = ImageTokenizer.from_pretrained(with_decoder / "image_tokenizer")
    tok.pixel_decoder = PixelDiffusionDecoder(PixelDiffusionConfig(channels=8, channel_mult=[1]), 32, 32)
    tok.pixel_decoder.residual_scale.fill_(0.1)
    tok.save_pretrained(with_decoder / "image_tokenizer")
    out = tmp_path / "bundles.json"
    args = ["--bundles", str(tiny_bundle), str(with_decoder), "--batches", "1", "2", "--steps", "1", "3",
            "--repeats", "1", "--json", str(out)]  # fmt: skip
    assert bench_bundles.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    plain = [r for r in rows if r["bundle"] != "dec"]
    assert [(r["image out"], r["steps"], r["batch"]) for r in plain] == [
        ("VQ decoder", None, 1),
        ("VQ decoder", None, 2),
    ]
    dec = [(r["image out"], r["steps"], r["batch"]) for r in rows if r["bundle"] == "dec"]
    assert dec == [("VQ decoder", None, 1), ("VQ decoder", None, 2), ("diffusion decoder", 1, 1),
                   ("diffusion decoder", 1, 2), ("diffusion decoder", 3, 1), ("diffusion decoder", 3, 2)]  # fmt: skip
    decoder_params = sum(p.numel() for p in tok.pixel_decoder.parameters())
    assert all(r["decoder params"] == (decoder_params if r["bundle"] == "dec" else 0) for r in rows)
    assert all(r["ms/image"] > 0 and r["tokens"] == "raster" and r["transformer params"] > 0 for r in rows)
    assert torch.isfinite(torch.tensor([r["images/s"] for r in rows])).all()
