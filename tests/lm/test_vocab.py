"""The joint vocabulary: id layout, code <-> id round trips, sequences, serialisation."""

import pytest
import torch

from unimodal.lm.vocab import JointVocab

VOCAB = JointVocab(text_size=50, image_size=20, image_grid=(2, 3), max_text_tokens=5)


def test_vocab_layout_and_round_trip(tmp_path):
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
    v.save(tmp_path)
    assert JointVocab.load(tmp_path) == v  # vocab.json, as a bundle holds it
