"""The grammar: which ids may follow which, in both orders, as states, allowed sets and a logits processor."""

from dataclasses import replace

import pytest
import torch
from transformers import LogitsProcessorList

from unimodal.lm.grammar import (
    CAPTION_START,
    DONE,
    END,
    IMAGE,
    IMAGE_FULL,
    TEXT,
    TEXT_FULL,
    GrammarLogitsProcessor,
    GrammarSteps,
    SegmentGrammar,
    _unique_rows,
)
from unimodal.lm.transformer import TransformerConfig, build_transformer
from unimodal.lm.vocab import JointVocab

VOCAB = JointVocab(text_size=50, image_size=20, image_grid=(2, 3), max_text_tokens=5)


def test_grammar_states_along_a_sequence():
    v, g = VOCAB, SegmentGrammar(VOCAB)
    seq = v.text_to_image_sequence([1, 2], torch.arange(6).view(2, 3))
    states = g.states(torch.tensor([seq]))[0].tolist()
    assert states == [TEXT, TEXT, TEXT, IMAGE, *[IMAGE] * 5, IMAGE_FULL, END, DONE]
    full_text = [v.bos, 1, 2, 3, 4, 5]
    assert g.states(torch.tensor([full_text]))[0, -1] == TEXT_FULL
    assert g.is_valid(seq)
    assert not g.is_valid(seq[:3] + [v.eoi] + seq[4:])  # <eoi> where <boi> must come
    assert not g.is_valid(seq[:5] + [7] + seq[6:])  # a text id inside the image


def test_allowed_sets_are_exactly_the_grammar():
    v, g = VOCAB, SegmentGrammar(VOCAB)
    text_ids, image_ids = set(range(v.text_size)), set(range(v.image_offset, v.special_offset))

    def allowed(prefix):
        return set(torch.nonzero(g.allowed_next(torch.tensor([prefix]))[0]).flatten().tolist())

    assert allowed([v.bos]) == text_ids | {v.boi}
    assert allowed([v.bos, 1, 2, 3, 4, 5]) == {v.boi}
    assert allowed([v.bos, 1, v.boi]) == image_ids
    assert allowed([v.bos, v.boi, *[v.image_offset] * 6]) == {v.eoi}
    assert allowed([v.bos, v.boi, *[v.image_offset] * 6, v.eoi]) == {v.eos}
    assert allowed([v.pad, v.pad, v.bos, 3]) == text_ids | {v.boi}  # left padding is ignored


def test_image_range_is_what_every_image_step_allows_and_refuses_other_states():
    v, g = VOCAB, SegmentGrammar(VOCAB)
    prompts = torch.tensor([[v.pad, v.bos, 1, v.boi], [v.bos, 2, 3, v.boi]])  # left-padded, both after <boi>
    lo, hi = g.image_range(prompts)
    expected = torch.zeros(v.size, dtype=torch.bool)
    expected[lo:hi] = True
    for k in range(v.image_tokens):  # every step inside the image allows exactly [lo, hi)
        prefix = torch.cat([prompts, torch.full((2, k), lo)], 1)
        assert torch.equal(g.allowed_next(prefix), expected.expand(2, -1))
    with pytest.raises(ValueError, match="start of an image"):
        g.image_range(torch.tensor([[v.bos, 1, 2]]))  # still in the caption
    with pytest.raises(ValueError, match="start of an image"):
        g.image_range(torch.tensor([[v.bos, v.boi, lo]]))  # one code already drawn


@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_untrained_model_never_samples_a_forbidden_id(top_k):
    """An untrained model puts mass everywhere; the processor alone must keep every sequence legal."""
    torch.manual_seed(0)
    v, g = VOCAB, SegmentGrammar(VOCAB)
    model = build_transformer(TransformerConfig(n_layers=1, d_model=32, n_heads=2, ffn_hidden=64), v).eval()
    prompts = torch.tensor([[v.bos, 1, 2, v.boi]] * 64)
    out = model.generate(
        input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=v.image_tokens + 2,
        do_sample=True, top_k=top_k, logits_processor=LogitsProcessorList([GrammarLogitsProcessor(g)]),
        pad_token_id=v.pad, eos_token_id=v.eos,
    )  # fmt: skip
    for row in out.tolist():
        assert g.is_valid(row), row
        assert len(v.split_sequence(row)[1]) == v.image_tokens
    # also from <bos> alone: free text of any length, then a full image
    free = model.generate(
        input_ids=torch.tensor([[v.bos]] * 64), max_new_tokens=v.max_sequence_length, do_sample=True,
        logits_processor=LogitsProcessorList([GrammarLogitsProcessor(g)]), pad_token_id=v.pad, eos_token_id=v.eos,
    )  # fmt: skip
    for row in free.tolist():
        row = row[: row.index(v.eos) + 1] if v.eos in row else row
        assert g.is_valid(row), row


@pytest.mark.parametrize("image_to_text", [False, True])
def test_processor_counting_one_id_per_step_equals_recounting_the_prefix(image_to_text):
    """Decoding advances the grammar by the newest id; every step must match a full recount."""
    v = JointVocab(text_size=6, image_size=4, image_grid=(1, 3), max_text_tokens=3, image_to_text=image_to_text)
    g = SegmentGrammar(v)
    torch.manual_seed(0)
    ids = torch.randint(0, v.size, (64, 16))  # every kind of id, legal or not, in any order
    ids[:, 2] = v.bos  # two ids of left padding-like junk first, as recounting ignores them
    ids[:8, 3] = v.boi  # some rows go straight to the image (image-to-text order when allowed)
    processor = GrammarLogitsProcessor(g)
    scores = torch.zeros(ids.shape[0], v.size)
    for t in range(3, ids.shape[1] + 1):
        got = processor(ids[:, :t], scores) == 0
        assert torch.equal(got, g.allowed_next(ids[:, :t])), t
    states = g.states(ids)
    assert len(set(states[:, -1].tolist())) > 2  # the walk reached several states, or it proves little
    # a prefix that is not the last one plus an id (a new call) is recounted, not advanced
    assert torch.equal(processor(ids[:, :5], scores) == 0, g.allowed_next(ids[:, :5]))


def test_grammar_steps_sort_ids_into_the_kinds_advance_tells_apart():
    """Kinds come from `advance` itself: text ids, image ids and each special move the counts differently;
    <pad> and ids past the specials move nothing. Grouping equals torch.unique over rows."""
    v = JointVocab(text_size=6, image_size=4, image_grid=(1, 3), max_text_tokens=3, image_to_text=True)
    steps = GrammarSteps(SegmentGrammar(v))
    kind = steps.kind
    assert len({kind[i] for i in range(v.text_size)}) == 1
    assert len({kind[i] for i in range(v.image_offset, v.special_offset)}) == 1
    named = [kind[0], kind[v.image_offset], kind[v.bos], kind[v.boi], kind[v.eoi], kind[v.eos], kind[v.pad]]
    assert len(set(named)) == 7 and len(set(kind)) == 7
    rows = torch.randint(0, 3, (500, 6))
    first, group = _unique_rows(rows)
    _, expected = torch.unique(rows, dim=0, return_inverse=True)
    assert torch.equal(rows[first][group], rows)
    assert len(first) == int(expected.max()) + 1  # as many groups as distinct rows


def test_processor_with_every_row_alike_and_with_rows_apart():
    """One state for the whole batch (the shortcut) and several states give the masks of a full recount."""
    v = JointVocab(text_size=6, image_size=4, image_grid=(1, 3), max_text_tokens=3)
    g = SegmentGrammar(v)
    same = torch.tensor([[v.bos, 1, v.boi] + [v.image_offset] * 3 + [v.eoi, v.eos]] * 4)
    apart = same.clone()
    apart[1] = torch.tensor([v.bos, v.boi] + [v.image_offset] * 3 + [v.eoi, v.eos, v.pad])  # one step ahead
    states = g.states(apart)
    assert (states[0] != states[1]).any() and (g.states(same) == g.states(same)[:1]).all()
    for ids in (same, apart):
        processor = GrammarLogitsProcessor(g)
        for t in range(3, ids.shape[1] + 1):
            got = processor(ids[:, :t], torch.zeros(ids.shape[0], v.size)) == 0
            assert torch.equal(got, g.allowed_next(ids[:, :t])), t


def test_both_orders_obey_the_grammar_and_t2i_only_vocab_is_unchanged():
    v = JointVocab(text_size=50, image_size=20, image_grid=(3, 3), max_text_tokens=6, image_to_text=True)
    g = SegmentGrammar(v)
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
