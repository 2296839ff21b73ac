"""Text-to-image sampling: parameter checks, classifier-free guidance against the library's guidance path,
the draw and the processor's distributions, every cache giving the same codes, the grammar always obeyed."""

import pytest
import torch
from transformers import LogitsProcessorList

from unimodal.generation.bundle import Bundle
from unimodal.generation.sampling import NextToken, SamplingParams, draw, generate_codes, generate_ids, left_pad
from unimodal.lm.grammar import GrammarLogitsProcessor, SegmentGrammar
from unimodal.lm.transformer import TransformerConfig, build_transformer
from unimodal.lm.vocab import JointVocab

VOCAB = JointVocab(text_size=50, image_size=20, image_grid=(3, 3), max_text_tokens=6, image_to_text=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_transformer(TransformerConfig(n_layers=2, d_model=32, n_heads=2, ffn_hidden=64), VOCAB).eval()


def _prompts():
    v = VOCAB
    return [v.prompt([1, 2, 3]), v.prompt([4]), v.prompt([5, 6, 7, 8, 9]), v.prompt([])]  # left padding needed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0}, "temperature must be"),
        ({"temperature": float("nan")}, "temperature must be"),
        ({"top_k": 0}, "top_k must be a positive integer"),
        ({"top_k": 2.5}, "top_k must be a positive integer"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"images_per_prompt": 0}, "images_per_prompt must be"),
        ({"batch_size": -1}, "batch_size must be"),
        ({"seed": -3}, "seed must be"),
        ({"cfg_scale": -1.0}, "cfg_scale must be"),
        ({"cfg_scale": float("inf")}, "cfg_scale must be"),
        ({"cache": "paged"}, "cache must be one of"),
        ({"use_cache": False, "cache": "static"}, "need use_cache=True"),
        ({"use_cache": False, "compile": True}, "need use_cache=True"),
        ({"cache": "dynamic", "compile": True}, "compile needs cache='static'"),
    ],
)
def test_invalid_sampling_parameters_give_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_doubled_batch_cfg_equals_the_transformers_guidance_path(model, scale):
    v = VOCAB
    rows = _prompts()
    mine = generate_codes(model, v, rows, SamplingParams(greedy=True, cfg_scale=scale))
    ids, mask = left_pad(rows, v.pad)
    out = model.generate(
        input_ids=ids, attention_mask=mask, guidance_scale=scale,
        negative_prompt_ids=torch.tensor([v.unconditional_prompt()] * len(rows)),
        do_sample=False, max_new_tokens=v.image_tokens + 2, pad_token_id=v.pad, eos_token_id=v.eos,
        logits_processor=LogitsProcessorList([GrammarLogitsProcessor(SegmentGrammar(v))]),
    )  # fmt: skip
    assert torch.equal(mine, v.ids_to_codes(out[:, ids.shape[1] : ids.shape[1] + v.image_tokens]))
    if scale == 7.5:  # guidance changes something, or the comparison above proves nothing
        assert not torch.equal(mine, generate_codes(model, v, rows, SamplingParams(greedy=True)))


def test_cfg_sampling_is_seeded_and_well_formed(model):
    v, g = VOCAB, SegmentGrammar(VOCAB)
    params = SamplingParams(seed=5, cfg_scale=3.0, temperature=1.5, top_k=8, top_p=0.95)
    prompts = _prompts()[:3] * 8  # with a caption: the grammar ends the row with <eoi> <eos>
    torch.manual_seed(5)
    a = generate_ids(model, v, prompts, params, v.image_tokens + 2, g)
    torch.manual_seed(5)
    b = generate_ids(model, v, prompts, params, v.image_tokens + 2, g)
    assert torch.equal(a, b) and len({tuple(r) for r in a.tolist()}) > 1
    for prompt, new in zip(prompts, a.tolist()):
        assert g.is_valid(prompt + new[: new.index(v.eos) + 1])


@pytest.mark.parametrize("use_cfg", [False, True])
def test_uncached_dynamic_and_static_cache_greedy_outputs_identical(model, use_cfg):
    scale = 2.0 if use_cfg else 1.0
    outs = [
        generate_codes(model, VOCAB, _prompts(), SamplingParams(greedy=True, cfg_scale=scale, **kw))
        for kw in ({"use_cache": False}, {"cache": "dynamic"}, {"cache": "static"})
    ]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_sampling_under_inference_mode_gives_the_same_codes(model):
    """A caller may wrap sampling in `torch.inference_mode` (no version counters on its tensors)."""
    params = SamplingParams(cache="static")
    torch.manual_seed(3)
    with torch.inference_mode():
        inside = generate_codes(model, VOCAB, _prompts(), params)
    torch.manual_seed(3)
    assert torch.equal(inside, generate_codes(model, VOCAB, _prompts(), params))


def test_image_sampling_skips_the_eos_check_and_draws_the_same_codes(model, monkeypatch):
    """After <boi> no row can reach <eos> before the last of its N + 2 steps, so `generate_codes` drops
    generate()'s per-step EOS criterion and draws what it would draw with it."""
    import transformers.generation.stopping_criteria as sc

    kinds, call = [], sc.StoppingCriteriaList.__call__
    spy = lambda self, *a, **kw: kinds.append({type(c).__name__ for c in self}) or call(self, *a, **kw)  # noqa: E731
    monkeypatch.setattr(sc.StoppingCriteriaList, "__call__", spy)
    params, rows = SamplingParams(cache="static"), _prompts()
    torch.manual_seed(0)
    checked = generate_ids(model, VOCAB, rows, params, VOCAB.image_tokens + 2, SegmentGrammar(VOCAB))
    assert "EosTokenCriteria" in kinds[-1] and not (checked[:, :-1] == VOCAB.eos).any()
    kinds.clear()
    torch.manual_seed(0)
    codes = generate_codes(model, VOCAB, rows, params)
    assert kinds and not any("EosTokenCriteria" in k for k in kinds)
    assert torch.equal(codes, VOCAB.ids_to_codes(checked[:, : VOCAB.image_tokens]))


def test_untrained_model_sampling_both_orders_stays_in_the_grammar(model):
    """From <bos> alone the model picks the order; from an image prompt it must caption."""
    torch.manual_seed(0)
    v, g = VOCAB, SegmentGrammar(VOCAB)
    free = generate_ids(model, v, [[v.bos]] * 96, SamplingParams(temperature=3.0), v.max_sequence_length, g)
    orders = set()
    for row in free.tolist():
        seq = [v.bos, *row[: row.index(v.eos) + 1]]
        assert g.is_valid(seq), seq
        orders.add("i2t" if seq[1] == v.boi and seq[-2] != v.eoi else "t2i")
    assert orders == {"t2i", "i2t"}
    caption_grammar = SegmentGrammar(v, require_caption=True)
    prompts = [v.caption_prompt(torch.randint(0, 20, (3, 3))) for _ in range(32)]
    new = generate_ids(model, v, prompts, SamplingParams(temperature=3.0), v.max_text_tokens + 1, caption_grammar)
    for prompt, row in zip(prompts, new.tolist()):
        seq = prompt + row[: row.index(v.eos) + 1]
        assert caption_grammar.is_valid(seq) and 1 <= len(v.split_sequence(seq)[0]) <= v.max_text_tokens


def test_draw_follows_the_softmax_and_never_picks_a_forbidden_id():
    torch.manual_seed(0)
    scores = torch.tensor([[0.0, 1.0, float("-inf"), 2.0, float("-inf")]]).repeat(40_000, 1)
    ids = draw(scores)
    assert ids.shape == (40_000, 1)
    freq = torch.bincount(ids.flatten(), minlength=5).double() / ids.numel()
    assert freq[2] == 0 and freq[4] == 0
    assert torch.allclose(freq, scores[0].softmax(-1).double(), atol=0.01)
    only_last = torch.full((1000, 5), float("-inf"))
    only_last[:, 4] = 0.0  # all mass on the last id: nothing lies past it to land on
    assert (draw(only_last) == 4).all()
    assert (draw(torch.tensor([[float("-inf"), 5.0, float("-inf")]] * 1000)) == 1).all()


@pytest.mark.parametrize("top_k", [None, 3])
def test_sampling_draws_over_the_grammars_range_with_the_full_vocabularys_distribution(top_k):
    """Inside an image every row may only take a code: NextToken warps and draws over the code range alone.
    The draws must follow softmax over the allowed ids (top-k of them) as over the whole vocabulary."""
    v = JointVocab(text_size=6, image_size=4, image_grid=(1, 3), max_text_tokens=3)
    prefix = torch.tensor([[v.bos, 1, v.boi]] * 20_000)
    scores = torch.randn(1, v.size).repeat(prefix.shape[0], 1)
    processor = NextToken(SegmentGrammar(v), SamplingParams(top_k=top_k))
    torch.manual_seed(0)
    ids = processor(prefix, scores.clone()).argmax(-1)
    assert processor.grammar.support == (v.image_offset, v.special_offset)
    allowed = torch.full_like(scores[0], float("-inf"))
    allowed[v.image_offset : v.special_offset] = scores[0, v.image_offset : v.special_offset]
    if top_k is not None:
        allowed[allowed < allowed.topk(top_k).values[-1]] = float("-inf")
    freq = torch.bincount(ids, minlength=v.size).double() / ids.numel()
    assert torch.allclose(freq, allowed.softmax(-1).double(), atol=0.01)
    processor(torch.tensor([[v.bos, 1]] * 2), scores[:2].clone())  # text or <boi>: not one range
    assert processor.grammar.support is None


def test_guided_sampling_over_the_grammars_range_follows_the_guided_log_probabilities():
    """With guidance inside an image, NextToken mixes the two rows' logits over the code range alone:
    the draws must follow softmax over the allowed ids of u + s * (c - u) with c and u the two rows'
    log-probabilities over the whole vocabulary (the library's guidance formula), and a row and its
    unconditional twin append the same id."""
    v = JointVocab(text_size=6, image_size=4, image_grid=(1, 3), max_text_tokens=3)
    n, scale = 20_000, 2.5
    prefix = torch.tensor([[v.bos, 1, v.boi]] * n + [[v.pad, v.bos, v.boi]] * n)
    torch.manual_seed(1)
    cond, uncond = torch.randn(v.size) * 2, torch.randn(v.size) * 2
    scores = torch.cat([cond.repeat(n, 1), uncond.repeat(n, 1)])
    processor = NextToken(SegmentGrammar(v), SamplingParams(cfg_scale=scale))
    torch.manual_seed(0)
    ids = processor(prefix, scores.clone()).argmax(-1)
    assert processor.grammar.support == (v.image_offset, v.special_offset)
    assert torch.equal(ids[:n], ids[n:])
    c, u = cond.log_softmax(-1), uncond.log_softmax(-1)
    guided = torch.full_like(c, float("-inf"))
    codes = slice(v.image_offset, v.special_offset)
    guided[codes] = (u + scale * (c - u))[codes]
    freq = torch.bincount(ids[:n], minlength=v.size).double() / n
    assert torch.allclose(freq, guided.softmax(-1).double(), atol=0.01)


# on a bundle (conftest): untrained, and trained

PROMPTS = ["a large red circle at the top left", "blue square, bottom right, small", "🐱 unseen words"]


def test_cached_and_uncached_greedy_generation_agree(bundle):
    v = bundle.vocab
    rows = [v.prompt(bundle.text_tokenizer.encode(p)) for p in PROMPTS]  # different lengths: left padding
    cached = generate_codes(bundle.transformer, v, rows, SamplingParams(greedy=True, use_cache=True))
    uncached = generate_codes(bundle.transformer, v, rows, SamplingParams(greedy=True, use_cache=False))
    assert torch.equal(cached, uncached)


def test_grammar_is_respected_by_the_trained_model(trained):
    bundle = Bundle.load(trained["bundle"])
    v, g = bundle.vocab, SegmentGrammar(bundle.vocab)
    rows = [v.prompt(bundle.text_tokenizer.encode(p)) for p in PROMPTS]
    codes = generate_codes(bundle.transformer, v, rows, SamplingParams(seed=0, temperature=2.0))
    for prompt, c in zip(rows, codes):
        assert g.is_valid(v.text_to_image_sequence(prompt[1:-1], c))


FUZZ_PROMPTS = ["a red circle at the top left", "", "   ", "🐱🐶", "日本語のキャプション", "x" * 500,
                "a " * 100, "\n\t", "<bos> <boi> <eoi>", "RED CIRCLE TOP LEFT"]  # fmt: skip
FUZZ_PARAMS = [dict(), dict(temperature=0.1), dict(temperature=5.0), dict(top_k=1), dict(top_k=10**6),
               dict(top_p=0.01), dict(top_p=1.0), dict(greedy=True), dict(temperature=0), dict(temperature=-1),
               dict(top_k=0), dict(top_p=0), dict(top_p=1.5), dict(images_per_prompt=0), dict(batch_size=0),
               dict(temperature=float("nan")), dict(images_per_prompt=3, batch_size=2)]  # fmt: skip


def test_fuzz_prompts_and_sampling_parameters(bundle):
    """Every combination either returns full images or raises a ValueError that says what is wrong."""
    r = bundle.image_tokenizer.config.resolution
    accepted = refused = 0
    for i, kw in enumerate(FUZZ_PARAMS):
        prompts = [FUZZ_PROMPTS[i % len(FUZZ_PROMPTS)], FUZZ_PROMPTS[(i + 3) % len(FUZZ_PROMPTS)]]
        try:
            params = SamplingParams(seed=i, **kw)
        except ValueError as err:
            refused += 1
            assert any(
                name in str(err) for name in ("temperature", "top_k", "top_p", "images_per_prompt", "batch_size")
            ), err
            continue
        images = bundle.generate(prompts, params)
        assert images.shape == (2 * params.images_per_prompt, 3, r, r) and torch.isfinite(images).all()
        accepted += 1
    assert accepted >= 8 and refused >= 7 and accepted + refused == len(FUZZ_PARAMS)
