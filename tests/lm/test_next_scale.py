"""Next-scale prediction on the joint sequence: the vocabulary's multi-scale layout, the block-causal mask
against VAR's rule written out position by position, the teacher-forced queries, and the mask reaching the
library's attention (a query block's outputs do not depend on its own scale's codes)."""

import pytest
import torch

from unimodal.lm.grammar import SegmentGrammar
from unimodal.lm.next_scale import (
    ScaleLayout,
    block_causal_mask,
    boi_positions,
    forward,
    position_blocks,
    prefix_mask,
    query_inputs,
)
from unimodal.lm.transformer import TransformerConfig, build_transformer
from unimodal.lm.vocab import JointVocab

SCALES = (1, 2, 3, 4)
N = 1 + 4 + 9 + 16
VOCAB = JointVocab(text_size=50, image_size=20, image_grid=(4, 4), max_text_tokens=5, image_scales=SCALES)


def test_vocabulary_layout():
    v = VOCAB
    assert v.image_tokens == N and v.size == 50 + 20 + 5 + 4
    assert [v.level(k) for k in range(4)] == [75, 76, 77, 78]
    codes = torch.randint(0, 20, (2, N))
    assert torch.equal(v.ids_to_codes(v.codes_to_ids(codes)), codes)
    assert JointVocab.from_dict(v.to_dict()) == v
    assert "image_scales" not in JointVocab(50, 20, (4, 4)).to_dict()  # raster vocab.json unchanged
    seq = v.text_to_image_sequence([1, 2], codes[0])
    assert len(seq) == 1 + 2 + 1 + N + 2 and SegmentGrammar(v).is_valid(seq)
    assert not SegmentGrammar(v).table[:, v.level_offset :].any()  # level ids are never allowed as outputs
    for bad in ((2, 4), (1, 2, 3), (1, 3, 2, 4)):
        with pytest.raises(ValueError, match="ascend from 1"):
            JointVocab(50, 20, (4, 4), image_scales=bad)
    with pytest.raises(ValueError, match="image_to_text"):
        JointVocab(50, 20, (4, 4), image_to_text=True, image_scales=SCALES)


def _var_rule(prefix_len: int, scales, trailing: int) -> torch.Tensor:
    """VAR's attention rule, written out per position: position t (predicting id t+1) may see u iff
    u <= t, or both predict codes of one scale (the queries of scale k see all of scale k's queries)."""
    n = sum(s * s for s in scales)
    length = prefix_len + n + trailing
    predicted_scale = {}
    for k, s in enumerate(scales):
        first = prefix_len - 1 + sum(r * r for r in scales[:k])
        for t in range(first, first + s * s):
            predicted_scale[t] = k
    rule = torch.zeros(length, length, dtype=torch.bool)
    for t in range(length):
        for u in range(length):
            same = t in predicted_scale and predicted_scale.get(u) == predicted_scale[t]
            rule[t, u] = u <= t or same
    return rule


@pytest.mark.parametrize("prefix_len, scales", [(4, SCALES), (2, (1, 2, 4, 8)), (3, (1,)), (5, (1, 2, 3, 4, 6, 8))])
def test_mask_is_vars_rule(prefix_len, scales):
    mask = prefix_mask(prefix_len, scales)
    assert mask.shape[:2] == (1, 1) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], _var_rule(prefix_len, scales, trailing=2))


def test_mask_per_row_with_padding():
    """Rows of different prefix lengths, left or right padded: each row is its own rule, pads are never keys."""
    v = VOCAB
    rows = [v.text_to_image_sequence(t, torch.zeros(N, dtype=torch.long)) for t in ([1, 2, 3], [])]
    width = max(map(len, rows))
    for side in ("left", "right"):
        ids = torch.full((2, width), v.pad)
        att = torch.zeros(2, width, dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, sl], att[i, sl] = torch.tensor(r), 1
        boi = boi_positions(ids, v)
        mask = block_causal_mask(position_blocks(boi, SCALES, width), att)[:, 0]
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            assert torch.equal(mask[i][sl, sl], _var_rule(r.index(v.boi) + 1, SCALES, 2))
            pads = ~att[i].bool()
            off_diagonal = mask[i] & ~torch.eye(width, dtype=torch.bool)
            assert not off_diagonal[:, pads].any()


def test_queries_are_the_previous_scale_upsampled():
    v, layout = VOCAB, ScaleLayout(VOCAB)
    codes = torch.arange(N) % 20
    ids = torch.tensor([v.text_to_image_sequence([7, 8], codes)])
    inputs, levels = query_inputs(ids, v)
    b = 3  # <bos> 7 8 <boi>
    assert inputs[0, b] == v.boi and levels[0, b] == -1
    image = ids[0, b + 1 : b + 1 + N]  # the stored codes
    maps = [image[s : s + n * n].view(n, n) for s, n in zip(layout.starts, SCALES, strict=True)]
    for k in range(1, 4):
        s, p = SCALES[k], SCALES[k - 1]
        expected = torch.tensor([[maps[k - 1][r * p // s, c * p // s] for c in range(s)] for r in range(s)])
        at = b + layout.starts[k]  # the positions that predict scale k
        assert torch.equal(inputs[0, at : at + s * s], expected.flatten())
        assert (levels[0, at : at + s * s] == v.level(k)).all()
        assert torch.equal(layout.upsample(maps[k - 1].flatten()[None], k)[0], expected.flatten())
    tail = b + N  # the last code's position and after: the stored ids, no level
    assert torch.equal(inputs[0, tail:], ids[0, tail:]) and (levels[0, tail:] == -1).all()
    assert torch.equal(inputs[0, :b], ids[0, :b])


def test_a_scale_is_predicted_without_its_own_codes():
    """Through the library's attention: changing scale k's codes (and later ones) leaves the logits of every
    position that predicts scales <= k unchanged, and changes the next scale's."""
    torch.manual_seed(0)
    model = build_transformer(TransformerConfig(n_layers=2, d_model=32, n_heads=4, ffn_hidden=64), VOCAB).eval()
    codes = torch.randint(0, 20, (N,))
    layout = ScaleLayout(VOCAB)
    b = 3
    base = torch.tensor([VOCAB.text_to_image_sequence([1, 2], codes)])
    att = torch.ones_like(base)
    logits = forward(model, VOCAB, base, att).logits
    for k in range(len(SCALES) - 1):
        changed = codes.clone()
        changed[layout.starts[k] :] = (changed[layout.starts[k] :] + 1) % 20
        other = forward(model, VOCAB, torch.tensor([VOCAB.text_to_image_sequence([1, 2], changed)]), att).logits
        upto = b + layout.starts[k + 1]  # positions predicting scales <= k
        torch.testing.assert_close(other[0, :upto], logits[0, :upto])
        assert not torch.allclose(other[0, upto], logits[0, upto])
