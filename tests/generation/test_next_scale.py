"""Next-scale sampling: the KV-cached scale-by-scale logits equal one teacher-forced forward over the whole
sequence, guidance ramps and mixes as documented, and a saved and loaded multi-scale bundle samples the same
images for a seed."""

import pytest
import torch

from unimodal.generation.bundle import Bundle
from unimodal.generation.next_scale import generate_codes_next_scale, guidance_ramp, scale_logits
from unimodal.generation.sampling import SamplingParams, left_pad
from unimodal.lm import next_scale
from unimodal.lm.transformer import TransformerConfig, build_transformer
from unimodal.lm.vocab import JointVocab
from unimodal.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from unimodal.tokenizers.text import TextTokenizer

SCALES = (1, 2, 3, 4)
VOCAB = JointVocab(text_size=50, image_size=20, image_grid=(4, 4), max_text_tokens=5, image_scales=SCALES)


def _model(vocab=VOCAB):
    torch.manual_seed(0)
    return build_transformer(TransformerConfig(n_layers=2, d_model=32, n_heads=4, ffn_hidden=64), vocab).eval()


@torch.no_grad()
def test_cached_scale_by_scale_logits_equal_one_teacher_forced_forward():
    model, v = _model(), VOCAB
    prompts = [v.prompt([1, 2, 3, 4]), v.prompt([5]), v.unconditional_prompt()]  # left padding of 3 lengths
    g = torch.Generator().manual_seed(0)
    seen = []

    def choose(k, logits):
        seen.append(logits)
        return torch.randint(v.image_offset, v.special_offset, logits.shape[:2], generator=g)

    image = scale_logits(model, v, prompts, choose)  # (3, N)
    assert [t.shape[1] for t in seen] == [s * s for s in SCALES]
    rows = [p + image[i].tolist() + [v.eoi, v.eos] for i, p in enumerate(prompts)]
    ids, att = left_pad(rows, v.pad)
    full = next_scale.forward(model, v, ids, att).logits  # (3, T, V)
    boi = ids.shape[1] - v.image_tokens - 3  # the <boi> column (every row ends with its image, <eoi>, <eos>)
    cached = torch.cat(seen, 1)  # (3, N, V): logits of every code
    diff = (cached - full[:, boi : boi + v.image_tokens]).abs().max()
    assert diff < 1e-4, diff


def test_guidance_ramps_from_none_to_cfg_scale():
    assert [guidance_ramp(3.0, k, 4) for k in range(4)] == pytest.approx([1.0, 5 / 3, 7 / 3, 3.0])
    assert guidance_ramp(3.0, 0, 1) == 3.0


def test_sampled_codes_are_codes_and_greedy_is_deterministic():
    model, v = _model(), VOCAB
    prompts = [v.prompt([1, 2]), v.prompt([3])]
    for params in (SamplingParams(greedy=True), SamplingParams(top_k=5, top_p=0.9, cfg_scale=2.0, temperature=0.8)):
        torch.manual_seed(0)
        a = generate_codes_next_scale(model, v, prompts, params)
        torch.manual_seed(0)
        b = generate_codes_next_scale(model, v, prompts, params)
        assert a.shape == (2, v.image_tokens) and 0 <= int(a.min()) and int(a.max()) < v.image_size
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="do not stand at the start of an image"):
        generate_codes_next_scale(model, v, [[v.bos, 1]], SamplingParams())
    with pytest.raises(ValueError, match="one path"):
        generate_codes_next_scale(model, v, prompts, SamplingParams(compile=True))


def test_top_k_one_is_greedy():
    model, v = _model(), VOCAB
    prompts = [v.prompt([1, 2]), v.prompt([3])]
    greedy = generate_codes_next_scale(model, v, prompts, SamplingParams(greedy=True, cfg_scale=1.5))
    top1 = generate_codes_next_scale(model, v, prompts, SamplingParams(top_k=1, cfg_scale=1.5, seed=3))
    assert torch.equal(greedy, top1)


def test_saved_and_loaded_bundle_samples_identically(tmp_path):
    text = TextTokenizer.train([f"a {c} square" for c in ("red", "green", "blue")] * 4, vocab_size=280)
    torch.manual_seed(0)
    config = ImageTokenizerConfig(resolution=32, channels=8, code_dim=8, codebook_size=32, quantizer="multiscale",
                                  scales=[1, 2, 4, 8])  # fmt: skip
    image = ImageTokenizer(config).eval()
    vocab = JointVocab(text.vocab_size, 32, image.grid, max_text_tokens=8, image_scales=image.scales)
    bundle = Bundle(text, image, vocab, _model(vocab))
    params = SamplingParams(seed=7, top_k=10, cfg_scale=2.0, images_per_prompt=2)
    before = bundle.generate(["a red square", "a blue square"], params)
    loaded = Bundle.load(bundle.save(tmp_path / "bundle"))
    assert loaded.vocab == vocab and loaded.image_tokenizer.scales == (1, 2, 4, 8)
    after = loaded.generate(["a red square", "a blue square"], params)
    assert before.shape == (4, 3, 32, 32) and torch.equal(before, after)
    assert not torch.equal(before, bundle.generate(["a red square", "a blue square"], SamplingParams(seed=8)))
