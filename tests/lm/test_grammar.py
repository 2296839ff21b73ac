import pytest
import torch
from transformers import LogitsProcessorList
from unimodal.lm.grammar import (
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

from unimodal.lm.transformer import TransformerConfig, build_transformer, sequence_loss
from unimodal.lm.vocab import JointVocab

VOCAB = JointVocab(text_size=50, image_size=20, image_grid=(2, 3), max_text_tokens=5)


def test_vocab_layout_and_round_trip():
    v = VOCAB
    specials = [v.bos, v.boi, v.eoi, v.eos, v.pad]
    assert len(set(specials)) == 5 and min(specials) == v.special_offset and max(specials) == v.size - 1
    codes = torch.randint(0, 20, (4, 2, 3))
    ids = v.codes_to_ids(codes)
    assert ids.shape == (4, 6) and v.is_image(ids).all() and not v.is_text(ids).any()
    assert torch.equal(v.ids_to_codes(ids), codes)
    seq = v.text_to_image_sequence([3, 4, 5], codes[0])
    assert seq[0] == v.bos and seq[4] == v.boi and seq[-2:] == [v.eoi, v.eos]
    text, flat = v.split_sequence(seq)
    assert text == [3, 4, 5] and flat == codes[0].flatten().tolist()
    assert JointVocab.from_dict(v.to_dict()) == v
    with pytest.raises(ValueError, match="outside the image range"):
        v.ids_to_codes(torch.tensor([[1, 2, 3, 4, 5, 6]]))
    long = v.text_to_image_sequence(list(range(9)), codes[0])  # text over budget is truncated
    assert long[1 : 1 + v.max_text_tokens + 1] == [0, 1, 2, 3, 4, v.boi]


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


def test_segment_weights_and_grammar_masked_loss():
    v, g = VOCAB, SegmentGrammar(VOCAB)
    torch.manual_seed(0)
    seqs = torch.tensor([v.text_to_image_sequence([1, 2, 3], torch.randint(0, 20, (2, 3))) for _ in range(4)])
    mask = torch.ones_like(seqs)
    logits = torch.randn(*seqs.shape, v.size)
    plain, parts = sequence_loss(logits, seqs, mask, g, {"text": 1, "image": 1}, mask_by_grammar=False)
    masked, _ = sequence_loss(logits, seqs, mask, g, {"text": 1, "image": 1}, mask_by_grammar=True)
    assert torch.isfinite(masked) and masked < plain  # renormalising over allowed ids only lowers CE
    assert parts["image"][1] == 4 * v.image_tokens and parts["text"][1] == 4 * (len(seqs[0]) - 1 - v.image_tokens)
    image_only, _ = sequence_loss(logits, seqs, mask, g, {"text": 0, "image": 1}, mask_by_grammar=False)
    assert torch.isclose(image_only, parts["image"][0] / parts["image"][1])
    mask[:, -2:] = 0  # padded targets (here <eoi> <eos>) do not count
    _, parts_pad = sequence_loss(logits, seqs, mask, g, {"text": 1, "image": 1}, mask_by_grammar=True)
    assert parts_pad["text"][1] == parts["text"][1] - 4 * 2


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
