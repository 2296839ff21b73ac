"""The bundle: the whole system in one folder; generation from it, saving and loading it, its parts
loading with plain transformers, and refusing an inconsistent one."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from unimodal.generation.bundle import Bundle
from unimodal.generation.sampling import SamplingParams

PROMPTS = ["a large red circle at the top left", "blue square, bottom right, small", "🐱 unseen words"]


def test_generated_sequences_always_decode_to_images(bundle):
    images = bundle.generate(PROMPTS, SamplingParams(images_per_prompt=3, seed=1, top_k=5))
    r = bundle.image_tokenizer.config.resolution
    assert images.shape == (9, 3, r, r) and torch.isfinite(images).all()


def test_sampling_is_seeded_and_leaves_global_rng_alone(bundle):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = bundle.generate(PROMPTS[:1], SamplingParams(seed=7, images_per_prompt=2))
    assert torch.equal(torch.get_rng_state(), before)
    b = bundle.generate(PROMPTS[:1], SamplingParams(seed=7, images_per_prompt=2))
    c = bundle.generate(PROMPTS[:1], SamplingParams(seed=8, images_per_prompt=2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bundle_save_load_gives_identical_samples(bundle, tmp_path):
    bundle.save(tmp_path / "copy")
    again = Bundle.load(tmp_path / "copy")
    params = SamplingParams(seed=3, images_per_prompt=2)
    assert torch.equal(bundle.generate(PROMPTS, params), again.generate(PROMPTS, params))
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left nothing behind
    weights = sorted(
        p.name for p in (tmp_path / "copy").rglob("*") if p.suffix in (".bin", ".pt", ".ckpt", ".safetensors")
    )
    assert weights and all(w.endswith(".safetensors") for w in weights)


def test_parts_load_with_plain_transformers(tiny_bundle, bundle):
    """No project code: transformers alone loads the transformer and the text tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(tiny_bundle / "transformer")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny_bundle / "text_tokenizer" / "tokenizer.json"))
    assert model.config.vocab_size == bundle.vocab.size
    ids = tok("a red circle")["input_ids"]
    assert ids == bundle.text_tokenizer.encode("a red circle")
    x = torch.tensor([bundle.vocab.prompt(ids)])
    assert torch.allclose(model(x).logits, bundle.transformer(x).logits)


def test_bundle_with_mismatched_vocab_is_refused(bundle, tmp_path):
    bundle.save(tmp_path / "b")
    vocab = json.loads((tmp_path / "b" / "vocab.json").read_text())
    vocab["image_size"] += 1
    (tmp_path / "b" / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="inconsistent.*image tokenizer has K="):
        Bundle.load(tmp_path / "b")
