"""Stage 2 over continuous image tokens through the real CLIs: a tiny kl tokenizer fit, then a tiny continuous
fit whose exported bundle loads, samples, and beats its untrained start on the validation image loss."""

import csv

import pytest
import torch

from unimodal.generation.bundle import Bundle
from unimodal.generation.sampling import SamplingParams

from ..conftest import fit_tokenizer, transformer_args


@pytest.mark.slow
def test_a_tiny_continuous_fit_exports_a_bundle_that_samples(tmp_path, hf_cache):
    from unimodal.training.fit import ContinuousCLI

    tokenizer = fit_tokenizer(tmp_path, hf_cache, steps=30, name="kl",
                              extra=["--model.model.quantizer", "kl", "--model.model.latent_dim", "8"])  # fmt: skip
    every = ["--trainer.max_steps", "40", "--trainer.val_check_interval", "20", "--data.caption_dropout", "0.1",
             "--data.batch_size", "16",
             "--model.head.width", "64", "--model.head.depth", "2", "--model.head.sample_steps", "10",
             "--samples.prompts", "[a red circle at the top left]", "--samples.images_per_prompt", "2"]  # fmt: skip
    ContinuousCLI(args=transformer_args(tmp_path, hf_cache, tokenizer, "mar", *every))
    bundle = Bundle.load(tmp_path / "mar" / "export")
    assert bundle.image_head is not None and bundle.vocab.image_size == 1
    images = bundle.generate(["a red circle at the top left"], SamplingParams(images_per_prompt=2, cfg_scale=3.0))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    rows = list(csv.DictReader(open(tmp_path / "mar" / "csv" / "metrics.csv")))
    val = [float(r["val/loss_image"]) for r in rows if r.get("val/loss_image")]
    assert len(val) == 2 and val[1] < val[0]
    assert (tmp_path / "mar" / "samples").is_dir()
