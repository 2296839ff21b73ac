"""The fast path (`generation.fast.decode`) against the plain path: the same codes from the same seed."""

from __future__ import annotations

import pytest
import torch

from unimodal.generation.fast.decode import _COMPILED, draw_with, generate_codes_fast
from unimodal.generation.sampling import SamplingParams, draw, generate_codes
from unimodal.lm.transformer import TransformerConfig, build_transformer
from unimodal.lm.vocab import JointVocab

VOCAB = JointVocab(text_size=50, image_size=24, image_grid=(4, 4), max_text_tokens=6)
PROMPTS = [VOCAB.prompt([1, 2, 3]), VOCAB.prompt([4, 5, 6, 7, 8]), VOCAB.prompt([9])]  # left padding


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_transformer(TransformerConfig(n_layers=2, d_model=32, n_heads=2, ffn_hidden=64), VOCAB).eval()


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process: a torch internal, pinned here and used by tests only."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_draw_with_given_uniforms_is_the_plain_draw():
    scores = torch.randn(5, 30).masked_fill(torch.rand(5, 30) < 0.3, float("-inf"))
    torch.manual_seed(3)
    plain = draw(scores)
    torch.manual_seed(3)
    assert torch.equal(draw_with(scores, torch.rand((5, 1), dtype=torch.float64)), plain)


def test_refuses_what_it_cannot_decode(model):
    with pytest.raises(ValueError, match="end them with <boi>"):
        generate_codes_fast(model, VOCAB, [VOCAB.prompt([1, 2]), [VOCAB.bos, 1, 2]], SamplingParams())
    for params in (SamplingParams(cache="dynamic"), SamplingParams(use_cache=False)):
        with pytest.raises(ValueError, match="static cache"):
            generate_codes_fast(model, VOCAB, PROMPTS, params)
    with pytest.raises(ValueError, match="no prompts"):
        generate_codes_fast(model, VOCAB, [], SamplingParams())


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        {"greedy": True},
        {"temperature": 0.7, "top_k": 5},
        {"cfg_scale": 3.0},
        {"cfg_scale": 3.0, "greedy": True},
        {"cfg_scale": 3.0, "temperature": 1.3, "top_p": 0.9},
    ],
    ids=["greedy", "temperature-top-k", "cfg", "cfg-greedy", "cfg-top-p"],
)
def test_same_codes_as_the_plain_path(model, settings):
    params = SamplingParams(seed=1, **settings)
    torch.manual_seed(1)
    plain = generate_codes(model, VOCAB, PROMPTS, params)
    plain_next = torch.rand(4)
    torch.manual_seed(1)
    fast = generate_codes_fast(model, VOCAB, PROMPTS, params)
    assert fast.shape == (len(PROMPTS), *VOCAB.image_grid)
    assert torch.equal(fast, plain)
    assert torch.equal(torch.rand(4), plain_next)  # the global generator is left where the plain path leaves it


@pytest.mark.slow
def test_a_second_call_reuses_the_compiled_step(model):
    params = SamplingParams(temperature=0.7, top_k=5)
    torch.manual_seed(5)
    first = generate_codes_fast(model, VOCAB, PROMPTS, params)
    steps = len(_COMPILED[model])
    graphs = compiled_graphs()
    torch.manual_seed(5)
    again = generate_codes_fast(model, VOCAB, PROMPTS, params)
    same_width = [VOCAB.prompt([9, 8, 7, 6, 5]), VOCAB.prompt([1]), VOCAB.prompt([2, 3])]
    other = generate_codes_fast(model, VOCAB, same_width, params)
    assert compiled_graphs() == graphs  # same shapes (batch, widest prompt) and settings: no new graph
    assert len(_COMPILED[model]) == steps
    assert torch.equal(again, first)
    assert other.shape == first.shape
    assert model.config._attn_implementation == "sdpa"  # the model's own attention again after the loop
