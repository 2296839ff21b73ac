"""A bundle of continuous image tokens: saved and loaded it samples the same images for a seed, its backbone
loads with plain transformers and reads `inputs_embeds`, an inconsistent one is refused, and `unimodal
sample` draws from it."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaModel

from unimodal.cli.commands import sample_main
from unimodal.generation.bundle import Bundle
from unimodal.generation.sampling import SamplingParams
from unimodal.lm.continuous import LatentHead
from unimodal.lm.diffloss import DiffLossConfig
from unimodal.lm.transformer import TransformerConfig, build_transformer
from unimodal.lm.vocab import JointVocab
from unimodal.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from unimodal.tokenizers.text import TextTokenizer

PROMPTS = ["a red circle", "a blue square"]


def continuous_bundle(process: str = "ddpm") -> Bundle:
    torch.manual_seed(0)
    text = TextTokenizer.train(["a red circle", "a blue square", "a green triangle"] * 4, vocab_size=280)
    image = ImageTokenizer(ImageTokenizerConfig(resolution=16, channels=8, quantizer="kl", latent_dim=4)).eval()
    vocab = JointVocab(text_size=text.vocab_size, image_size=1, image_grid=image.grid, max_text_tokens=8)
    transformer = build_transformer(TransformerConfig(n_layers=1, d_model=32, n_heads=2, ffn_hidden=64), vocab)
    head = LatentHead(DiffLossConfig(token_dim=4, cond_dim=32, width=32, depth=1, process=process, sample_steps=5))
    for p in head.parameters():  # off the zero start, so the samples depend on the weights
        torch.nn.init.normal_(p, std=0.1)
    return Bundle(text, image, vocab, transformer.eval(), image_head=head.eval())


@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_saved_and_loaded_bundle_samples_identically(tmp_path, process):
    bundle = continuous_bundle(process)
    params = SamplingParams(seed=3, images_per_prompt=2, cfg_scale=2.0)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    a = bundle.generate(PROMPTS, params)
    assert torch.equal(torch.get_rng_state(), before)  # seeded by its own generator
    assert a.shape == (4, 3, 16, 16) and torch.isfinite(a).all()
    loaded = Bundle.load(bundle.save(tmp_path / "bundle"))
    assert loaded.image_head is not None and sorted(p.name for p in (tmp_path / "bundle" / "image_head").iterdir()) == [
        "config.json", "model.safetensors"
    ]  # fmt: skip
    assert torch.equal(loaded.generate(PROMPTS, params), a)
    assert not torch.equal(loaded.generate(PROMPTS, SamplingParams(seed=4, images_per_prompt=2, cfg_scale=2.0)), a)


def test_the_backbone_loads_with_plain_transformers_and_reads_embeddings(tmp_path):
    bundle = continuous_bundle()
    bundle.save(tmp_path / "bundle")
    causal = AutoModelForCausalLM.from_pretrained(tmp_path / "bundle" / "transformer", use_safetensors=True)
    backbone = LlamaModel.from_pretrained(tmp_path / "bundle" / "transformer", use_safetensors=True)
    embeds = torch.randn(2, 5, 32)
    out = backbone(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(out, causal.get_decoder()(inputs_embeds=embeds).last_hidden_state)


def test_an_inconsistent_continuous_bundle_is_refused(tmp_path):
    folder = continuous_bundle().save(tmp_path / "bundle")
    shutil.rmtree(folder / "image_head")
    with pytest.raises(ValueError, match="image_head/ is missing"):
        Bundle.load(folder)
    bundle = continuous_bundle()
    bundle.image_head = LatentHead(DiffLossConfig(token_dim=6, cond_dim=32, width=16, depth=1))
    with pytest.raises(ValueError, match="reads 6 channels"):
        Bundle.load(bundle.save(tmp_path / "other"))


def test_codes_only_sampling_options_are_refused():
    with pytest.raises(ValueError, match="temperature and cfg_scale only"):
        continuous_bundle().generate(PROMPTS, SamplingParams(top_k=5))


def test_the_sample_command_draws_from_a_continuous_bundle(tmp_path):
    folder = continuous_bundle().save(tmp_path / "bundle")
    out = tmp_path / "grid.png"
    args = ["--bundle", str(folder), "--prompt", "a red circle", "--num-images", "2", "--out", str(out)]
    sample_main([*args, "--out-dir", str(tmp_path / "images"), "--cfg-scale", "3", "--device", "cpu"])
    assert out.is_file() and len(list((tmp_path / "images").iterdir())) == 2
