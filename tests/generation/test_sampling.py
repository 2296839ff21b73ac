"""Issue 5: classifier-free guidance, sampling controls, image -> text, caches, reranking."""

from dataclasses import replace

import pytest
import torch
from transformers import CompileConfig, LogitsProcessorList
from unimodal.generation.sampling import (
    COMPILED_LIVE_SDPA,
    LIVE_SDPA,
    GuardSkip,
    NextToken,
    SamplingParams,
    attention_implementation,
    decode_sdpa_mask,
    draw,
    filled_cache_attention,
    generate_codes,
    generate_ids,
    left_pad,
    live_sdpa_attention,
    live_sdpa_mask,
)

from unimodal.generation import sampling
from unimodal.evaluation.captioning import parse_caption
from unimodal.generation.bundle import Bundle
from unimodal.generation.caption import caption_images
from unimodal.generation.rerank import ContrastiveScorer, RerankerConfig, load_or_train_reranker, rerank
from unimodal.lm.grammar import CAPTION_START, END, GrammarLogitsProcessor, SegmentGrammar
from unimodal.lm.transformer import TransformerConfig, build_transformer
from unimodal.lm.vocab import JointVocab

VOCAB = JointVocab(text_size=50, image_size=20, image_grid=(3, 3), max_text_tokens=6, image_to_text=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_transformer(TransformerConfig(n_layers=2, d_model=32, n_heads=2, ffn_hidden=64), VOCAB).eval()


def _dynamo_eager_config() -> CompileConfig:
    """How generate() compiles in tests: dynamo's `eager` backend (the same graphs and guards, no
    inductor), on every device."""
    config = CompileConfig(dynamic=False, backend="eager")
    config._compile_all_devices = True
    return config


def _prompts():
    v = VOCAB
    return [v.prompt([1, 2, 3]), v.prompt([4]), v.prompt([5, 6, 7, 8, 9]), v.prompt([])]  # left padding needed


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


def test_cli_rejects_bad_cfg_scale_in_one_line(trained, capsys):
    from unimodal.cli.main import main

    assert main(["sample", "--bundle", str(trained["bundle"]), "--prompt", "a red circle", "--cfg-scale", "-2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unimodal sample: error: cfg_scale must be") and "\n" not in err


def test_both_orders_obey_the_grammar_and_t2i_only_vocab_is_unchanged():
    v, g = VOCAB, SegmentGrammar(VOCAB)
    codes = torch.arange(9).view(3, 3)
    t2i, i2t = v.text_to_image_sequence([1, 2], codes), v.image_to_text_sequence([3, 4], codes)
    assert g.is_valid(t2i) and g.is_valid(i2t) and g.is_valid(v.text_to_image_sequence([], codes))
    assert not g.is_valid(t2i[:-1] + [7, v.eos])  # a caption after the image when one came before
    assert g.states(torch.tensor([v.caption_prompt(codes)]))[0, -1] == CAPTION_START
    assert not SegmentGrammar(v, require_caption=True).is_valid(v.text_to_image_sequence([], codes))
    old = SegmentGrammar(replace(v, image_to_text=False))
    assert old.states(torch.tensor([v.caption_prompt(codes)]))[0, -1] == END and not old.is_valid(i2t)
    assert v.split_sequence(i2t) == ([3, 4], codes.flatten().tolist())
    with pytest.raises(ValueError, match="image_to_text"):
        SegmentGrammar(replace(v, image_to_text=False), require_caption=True)


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


def test_caption_pipeline_and_parser(bundle):
    with pytest.raises(ValueError, match="i2t_fraction"):
        caption_images(bundle, torch.zeros(1, 3, 32, 32))
    both = Bundle(bundle.text_tokenizer, bundle.image_tokenizer, replace(bundle.vocab, image_to_text=True),
                  bundle.transformer)  # fmt: skip
    r = bundle.image_tokenizer.config.resolution
    captions = caption_images(both, torch.rand(3, 3, r, r) * 2 - 1, SamplingParams(seed=0))
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    parsed = parse_caption("a large red circle at the top left and blue square, bottom right, small")
    assert parsed == {"colors": ["red", "blue"], "shapes": ["circle", "square"], "sizes": ["large", "small"],
                      "positions": ["top left", "bottom right"]}  # fmt: skip
    assert parse_caption("a red thing") == {"colors": [], "shapes": [], "sizes": [], "positions": []}


def test_caption_dropout_and_i2t_mix_depend_only_on_seed_and_batch_index(trained):
    from unimodal.training.datamodules import SequenceDataModule

    def dm(**kw):
        return SequenceDataModule(str(trained["tokenizer"]), str(trained["root"] / "text_tokenizer"), **kw)

    plain, mixed = dm(), dm(caption_dropout=0.3, i2t_fraction=0.3, mix_seed=1)
    assert not plain.vocab.image_to_text and mixed.vocab.image_to_text
    v, g = mixed.vocab, SegmentGrammar(mixed.vocab)
    codes = torch.randint(0, v.image_size, (64, *v.image_grid))
    batch = mixed._collate([{"input_ids": v.text_to_image_sequence([1, 2, 3], c)} for c in codes])
    assert plain.mix(batch, 0) is batch  # defaults: the batch is untouched
    a, b, c = mixed.mix(batch, 7), mixed.mix(batch, 7), mixed.mix(batch, 8)
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], c["input_ids"])
    kinds = []
    for ids, mask in zip(a["input_ids"], a["attention_mask"]):
        seq = ids[mask.bool()].tolist()
        assert g.is_valid(seq)
        kinds.append("i2t" if seq[1] == v.boi and seq[-2] != v.eoi else "null" if seq[1] == v.boi else "t2i")
    assert {"i2t", "null", "t2i"} == set(kinds)
    # in a fit, the hook keys the mix by the loop's batch counter, and leaves validation batches alone
    from types import SimpleNamespace

    progress = SimpleNamespace(total=SimpleNamespace(ready=7))
    mixed.trainer = SimpleNamespace(training=True, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
        batch_progress=progress)))  # fmt: skip
    assert torch.equal(mixed.on_before_batch_transfer(batch, 0)["input_ids"], a["input_ids"])
    mixed.trainer.training = False
    assert mixed.on_before_batch_transfer(batch, 0) is batch
    with pytest.raises(ValueError, match="caption_dropout must be in"):
        dm(caption_dropout=1.0)


def test_rerank_keeps_the_best_scored_candidates(tmp_path, bundle):
    config = RerankerConfig(text_size=bundle.vocab.text_size, train_pairs=256, epochs=1, batch_size=64, dim=32)
    scorer = load_or_train_reranker(tmp_path, config, bundle.text_tokenizer)
    again = load_or_train_reranker(tmp_path, config, bundle.text_tokenizer)  # cached: same weights
    assert all(torch.equal(p, q) for p, q in zip(scorer.state_dict().values(), again.state_dict().values()))
    images = torch.rand(2 * 4, 3, 32, 32) * 2 - 1
    ids = bundle.text_tokenizer.encode_batch(["a red circle at the top left", "blue square, bottom right"])
    kept, best = rerank(scorer, images, ids, candidates=4, keep=2)
    scores = scorer.score(images, [i for i in ids for _ in range(4)]).view(2, 4)
    assert kept.shape == (4, 3, 32, 32) and torch.equal(best, scores.topk(2, dim=1).indices)
    assert torch.equal(kept[0], images[best[0, 0]]) and torch.equal(kept[2], images[4 + best[1, 0]])
    with pytest.raises(ValueError, match="keep must be in"):
        rerank(scorer, images, ids, candidates=4, keep=5)
    assert isinstance(scorer, ContrastiveScorer)


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


@pytest.mark.parametrize("padded", [True, False])
def test_live_attention_reads_only_the_filled_part_of_a_static_cache(model, padded, monkeypatch):
    """Decoding the 8th token into a 12-slot static cache: the live mask spans the 7 filled keys,
    the tail is never read (NaN there changes nothing), and the result is SDPA's over those keys;
    SDPA gets the mask with padding and none without (every filled key allowed)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    module = model.model.layers[0].self_attn
    torch.manual_seed(0)
    q = torch.randn(3, 2, 1, 16)  # the model's 2 query heads and 1 key/value head
    k, v = torch.randn(3, 1, 12, 16), torch.randn(3, 1, 12, 16)
    padding = torch.ones(3, 7, dtype=torch.bool)
    if padded:
        padding[:2, :2] = False  # rows 0-1 left-padded by 2
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    spy = lambda *a, **kw: masks.append(kw.get("attn_mask")) or sdpa(*a, **kw)  # noqa: E731
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    k[:, :, 7:], v[:, :, 7:] = float("nan"), float("nan")
    mask = live_sdpa_mask(3, 1, 12, q_offset=6, attention_mask=padding, allow_is_causal_skip=False)  # a static cache's
    assert mask.shape == (3, 1, 1, 7)
    live, _ = live_sdpa_attention(module, q, k, v, mask, scaling=0.25)
    assert (masks[0] is None) == (not padded)
    reference, _ = sdpa_attention_forward(module, q, k[:, :, :7], v[:, :, :7], mask, scaling=0.25)
    assert torch.isfinite(live).all() and torch.allclose(live, reference)
    assert mask[:2, ..., :2].logical_not().all() == padded and mask[..., 2:].all()  # padding and causality kept
    full = sdpa_mask(3, 1, 12, q_offset=6, attention_mask=padding)  # the library's: every slot
    plain, _ = sdpa_attention_forward(module, q, k, v, full, scaling=0.25)
    assert not torch.isfinite(plain).all()  # plain SDPA reads the tail: the NaN shows
    prompt = {"attention_mask": padding, "allow_is_causal_skip": False}  # a whole prompt: the library's mask
    assert torch.equal(live_sdpa_mask(3, 7, 12, **prompt), sdpa_mask(3, 7, 12, **prompt))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_packed_attention_is_the_librarys_without_copying_keys_per_query_head(kv_heads, monkeypatch):
    """One decoded token with 4 query heads: the query heads sharing a key/value head as its rows give
    the library's SDPA attention (which, given a mask, repeats every key and value per query head),
    with left padding in the mask; `repeat_kv` is never called for it."""
    from transformers.integrations import sdpa_attention

    class Module:  # what the library's attention reads from a layer
        num_key_value_groups = 4 // kv_heads
        is_causal = True
        training = False

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 16), torch.randn(3, kv_heads, 9, 16), torch.randn(3, kv_heads, 9, 16)
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[:2, ..., :3] = False  # two rows left-padded
    reference, _ = sdpa_attention.sdpa_attention_forward(Module(), q, k, v, mask, scaling=0.25)
    if kv_heads < 4:
        monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda *a: pytest.fail("repeat_kv called"))
    for attention in (sampling.packed_sdpa_attention, sampling.compiled_packed_attention):  # SDPA / written out
        packed, _ = attention(Module(), q, k, v, mask, scaling=0.25)
        assert packed.shape == reference.shape == (3, 1, 4, 16)
        assert torch.allclose(packed, reference, atol=1e-6), attention.__name__


def _same_mask(a, b):
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def test_decode_mask_is_the_library_mask():
    """`decode_sdpa_mask` builds the library's `sdpa_mask` for one decoded token (any padding, filled
    length and cache length) and hands everything else to it; generation takes the fast path."""
    from transformers.masking_utils import sdpa_mask

    torch.manual_seed(0)
    for case in range(60):
        b, filled = int(torch.randint(1, 5, ())), int(torch.randint(1, 12, ()))
        kv_length = filled + int(torch.randint(0, 6, ()))
        padding = torch.rand(b, filled) > 0.3
        padding[:, -1] = True  # every row attends to the token it decodes
        args = (b, 1, kv_length)
        kw = {"q_offset": torch.tensor(filled - 1), "attention_mask": None if case % 3 == 0 else padding}
        kw["allow_is_causal_skip"] = False  # what decoding with a static cache asks for
        assert torch.equal(decode_sdpa_mask(*args, **kw), sdpa_mask(*args, **kw))
        kw["allow_is_causal_skip"] = True  # the library may skip the mask: its answer
        assert _same_mask(decode_sdpa_mask(*args, **kw), sdpa_mask(*args, **kw))
        longer = torch.cat([padding, torch.rand(b, 3) > 0.5], 1)  # a padding mask past the decoded key
        kw.update(attention_mask=longer, allow_is_causal_skip=False)
        assert torch.equal(decode_sdpa_mask(*args, **kw), sdpa_mask(*args, **kw))
    prompt = {"q_offset": 0, "attention_mask": torch.ones(2, 5, dtype=torch.bool), "allow_is_causal_skip": False}
    assert torch.equal(decode_sdpa_mask(2, 5, 9, **prompt), sdpa_mask(2, 5, 9, **prompt))


def test_decoding_builds_its_masks_on_the_fast_path(model, monkeypatch):
    """Generation hands `decode_sdpa_mask` what its fast path takes: the library's `sdpa_mask` builds the
    prompt's mask only (a change in what the library passes would silently lose the fast path)."""
    from transformers.masking_utils import sdpa_mask

    library_q_lengths = []  # of the masks the library builds
    monkeypatch.setattr(sampling, "sdpa_mask", lambda *a, **k: library_q_lengths.append(a[1]) or sdpa_mask(*a, **k))
    for rows in (_prompts(), [VOCAB.prompt([1, 2])]):  # left padding; none
        library_q_lengths.clear()
        generate_codes(model, VOCAB, rows, SamplingParams(greedy=True, cache="static"))
        assert library_q_lengths and all(q > 1 for q in library_q_lengths)  # prompts only, no decoding step


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_filled_cache_attention_reads_only_the_filled_keys_and_matches_repeated_kv_sdpa(kv_heads, padded):
    """The compiled graph's operator: given the library's whole-cache mask while decoding the 8th token
    of 12 slots, it reads keys 0..6 only (NaN beyond changes nothing) and equals SDPA with every
    key/value head repeated for its query heads, with left padding or without."""
    from transformers.masking_utils import sdpa_mask

    torch.manual_seed(0)
    q = torch.randn(3, 4, 1, 16)
    k, v = torch.randn(3, kv_heads, 12, 16), torch.randn(3, kv_heads, 12, 16)
    padding = torch.ones(3, 7, dtype=torch.bool)
    if padded:
        padding[:2, :2] = False  # rows 0-1 left-padded by 2
    full = sdpa_mask(3, 1, 12, q_offset=6, attention_mask=padding)  # (3, 1, 1, 12): the library's, every slot
    reference = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4 // kv_heads, 1), v.repeat_interleave(4 // kv_heads, 1), attn_mask=full, scale=0.25
    )
    k[:, :, 7:], v[:, :, 7:] = float("nan"), float("nan")
    out = filled_cache_attention(q, k, v, full, 0.25)
    assert out.shape == q.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, reference)
    k[:, :, 6] = float("nan")  # the key being decoded must be read
    assert not torch.isfinite(filled_cache_attention(q, k, v, full, 0.25)).all()


def test_decoding_mask_is_read_once_per_mask_and_again_when_it_changes():
    """Every layer of a step gets one mask object: `decoding_mask` reads it once, and reads it again
    for a new mask or one changed in place (a stale answer would attend to padding or cut keys)."""
    from unimodal.generation.sampling import decoding_mask

    mask = torch.zeros(2, 1, 1, 10, dtype=torch.bool)
    mask[..., :6] = True
    assert decoding_mask(mask) == (6, True) and decoding_mask(mask) == (6, True)
    mask[1, ..., :2] = False  # row 1 padded, in place: same object, new version
    assert decoding_mask(mask) == (6, False)
    mask[..., 6] = True  # one more filled key
    assert decoding_mask(mask) == (7, False)
    other = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    assert decoding_mask(other) == (10, True)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 1, 10, 8), torch.randn(2, 1, 10, 8)
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    filled_cache_attention(q, k, v, mask, None)  # read: dense
    mask[0, ..., :3] = False  # then padded in place: the operator must see it
    k4, v4 = k.expand(-1, 4, -1, -1), v.expand(-1, 4, -1, -1)  # the key/value head for each query head
    reference = torch.nn.functional.scaled_dot_product_attention(q, k4, v4, attn_mask=mask)
    torch.testing.assert_close(filled_cache_attention(q, k, v, mask, None), reference)
    with torch.inference_mode():  # tensors made here have no version counter: read at every call
        mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
        assert decoding_mask(mask) == (10, True)
        mask[0, ..., :3] = False
        assert decoding_mask(mask) == (10, False)
        torch.testing.assert_close(filled_cache_attention(q, k, v, mask, None), reference)


def test_sampling_under_inference_mode_gives_the_same_codes(model):
    """A caller may wrap sampling in `torch.inference_mode` (no version counters on its tensors)."""
    params = SamplingParams(cache="static")
    torch.manual_seed(3)
    with torch.inference_mode():
        inside = generate_codes(model, VOCAB, _prompts(), params)
    torch.manual_seed(3)
    assert torch.equal(inside, generate_codes(model, VOCAB, _prompts(), params))


def test_static_cache_with_live_attention_gives_the_dynamic_cache_logits(model):
    """Eager decoding with `LIVE_SDPA`, and a compiled forward (dynamo's `eager` backend: the same graph,
    no inductor) with `filled_cache_attention` inside, give the dynamic cache's logits."""
    ids, mask = left_pad(_prompts(), VOCAB.pad)
    compiled = _dynamo_eager_config()
    runs = {
        "dynamic": ("sdpa", {"cache_implementation": "dynamic"}),
        "static": (LIVE_SDPA, {"cache_implementation": "static"}),
        "static+compile": (COMPILED_LIVE_SDPA, {"cache_implementation": "static", "compile_config": compiled}),
    }
    logits = {}
    torch._dynamo.reset()
    for name, (attention, cache) in runs.items():
        with attention_implementation(model, attention):
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=VOCAB.pad, eos_token_id=None, **cache,
            )  # fmt: skip
        logits[name] = torch.stack(out.logits)
    torch._dynamo.reset()
    assert model.config._attn_implementation == "sdpa"  # restored
    torch.testing.assert_close(logits["dynamic"], logits["static"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["dynamic"], logits["static+compile"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 2, None])
def test_grouped_query_attention_knob_decodes_like_full_recomputation(kv_heads):
    """`n_kv_heads`: 1 (the default), 2, or one per query head (None); every cache gives the logits of
    full recomputation, and a bad count is refused with the rule."""
    config = TransformerConfig(n_layers=2, d_model=32, n_heads=4, ffn_hidden=64, n_kv_heads=kv_heads)
    torch.manual_seed(0)
    gqa = build_transformer(config, VOCAB).eval()
    assert gqa.model.layers[0].self_attn.k_proj.out_features == (kv_heads or 4) * 32 // 4  # heads of 8
    ids, mask = left_pad(_prompts(), VOCAB.pad)
    logits = {}
    for name, kwargs in (("none", {"use_cache": False}), ("dynamic", {}), ("static", {})):
        cache = {} if name == "none" else {"cache_implementation": name}
        with attention_implementation(gqa, LIVE_SDPA if name == "static" else "sdpa"):
            out = gqa.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=VOCAB.pad, eos_token_id=None, **kwargs, **cache,
            )  # fmt: skip
        logits[name] = torch.stack(out.logits)
    assert torch.allclose(logits["none"], logits["dynamic"], atol=1e-5)
    assert torch.allclose(logits["none"], logits["static"], atol=1e-5)
    with pytest.raises(ValueError, match="must be positive and divide n_heads"):
        TransformerConfig(n_heads=4, n_kv_heads=3)


@pytest.mark.parametrize("filled_from_rows", [1, 100], ids=["filled-cache-op", "whole-cache"])
def test_compiled_sampling_skips_guards_within_one_call_only(model, monkeypatch, filled_from_rows):
    """Compiled decoding gives eager decoding's codes, through `filled_cache_attention` or plain SDPA
    over the whole cache. From the second decoding step of a compiled call on, dynamo checks only the
    guards that tell its graphs apart; the next call (another batch: another graph) checks everything
    again at its first step, and the caller's stance comes back. Dynamo's `eager` backend: the same
    graphs and guards, no inductor."""
    monkeypatch.setattr(sampling, "COMPILED_LIVE_MIN_ROWS", filled_from_rows)
    config = _dynamo_eager_config()
    monkeypatch.setattr(sampling, "compile_config", lambda device: config)
    skipping = []  # per step: was skip_guard_eval_unsafe on after `GuardSkip.step`?
    step = GuardSkip.step

    def recording_step(self):
        step(self)
        skipping.append(torch._dynamo.eval_frame._stance.skip_guard_eval_unsafe)

    monkeypatch.setattr(GuardSkip, "step", recording_step)
    torch._dynamo.reset()
    for rows in (_prompts()[:2], _prompts()):  # batch 2, then batch 4: the second call needs a new graph
        skipping.clear()
        eager = generate_codes(model, VOCAB, rows, SamplingParams(greedy=True, cache="static"))
        assert len(skipping) == VOCAB.image_tokens + 2 and not any(skipping)  # eager decoding: nothing to skip
        skipping.clear()
        compiled = generate_codes(model, VOCAB, rows, SamplingParams(greedy=True, cache="static", compile=True))
        assert torch.equal(compiled, eager)
        assert skipping[0] is False and all(skipping[1:])  # on from the 2nd step: the 1st compiled one checked all
        assert not torch._dynamo.eval_frame._stance.skip_guard_eval_unsafe  # restored after the call
    skipping.clear()  # a caller's own stance is kept: no compiling, no skipping under force_eager
    with torch.compiler.set_stance("force_eager"):
        generate_codes(model, VOCAB, _prompts(), SamplingParams(greedy=True, cache="static", compile=True))
        assert torch._dynamo.eval_frame._stance.stance == "force_eager" and not any(skipping)
    skipping.clear()  # an error mid-call restores the stance too

    def failing_step(self):
        recording_step(self)
        if self.calls == 5:
            raise RuntimeError("stop")

    monkeypatch.setattr(GuardSkip, "step", failing_step)
    with pytest.raises(RuntimeError, match="stop"):
        generate_codes(model, VOCAB, _prompts(), SamplingParams(greedy=True, cache="static", compile=True))
    assert skipping[-1] and not torch._dynamo.eval_frame._stance.skip_guard_eval_unsafe
    torch._dynamo.reset()


@pytest.mark.parametrize("copies", [2, 5], ids=["8-rows-in-graph", "20-rows-operator"])
def test_inductor_compiled_decoding_gives_the_dynamic_cache_logits(copies):
    """The production path: inductor (C++ wrapper on the CPU, decomposed small products) with the
    attention written out in the graph (8 rows) or `filled_cache_attention` (20 rows), left padding and
    one key/value head, gives the dynamic cache's logits, and sampling's codes."""
    torch.manual_seed(0)
    tiny = build_transformer(TransformerConfig(n_layers=1, d_model=32, n_heads=2, ffn_hidden=64), VOCAB).eval()
    rows = _prompts() * copies
    operator = len(rows) >= sampling.COMPILED_LIVE_MIN_ROWS
    assert operator == (copies == 5)
    ids, mask = left_pad(rows, VOCAB.pad)
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=VOCAB.pad, eos_token_id=None)  # fmt: skip
    torch._dynamo.reset()
    dynamic = torch.stack(tiny.generate(cache_implementation="dynamic", **common).logits)
    with attention_implementation(tiny, COMPILED_LIVE_SDPA if operator else sampling.COMPILED_SDPA):
        out = tiny.generate(cache_implementation="static", compile_config=sampling.compile_config(ids.device), **common)
    torch.testing.assert_close(torch.stack(out.logits), dynamic, atol=1e-5, rtol=1e-5)
    eager = generate_codes(tiny, VOCAB, rows, SamplingParams(greedy=True, cache="static"))
    compiled = generate_codes(tiny, VOCAB, rows, SamplingParams(greedy=True, cache="static", compile=True))
    torch._dynamo.reset()
    assert torch.equal(compiled, eager)


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
