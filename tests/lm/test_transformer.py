"""The Llama-style transformer: its config's rules, the segment-weighted grammar-masked loss, and
grouped-query attention decoding like full recomputation with every cache."""

import pytest
import torch

from unimodal.generation.sampling import left_pad
from unimodal.lm.grammar import SegmentGrammar
from unimodal.lm.transformer import TransformerConfig, build_transformer, sequence_loss
from unimodal.lm.vocab import JointVocab

VOCAB = JointVocab(text_size=50, image_size=20, image_grid=(2, 3), max_text_tokens=5)


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


@pytest.mark.parametrize("kv_heads", [1, 2, None])
def test_grouped_query_attention_knob_decodes_like_full_recomputation(kv_heads):
    """`n_kv_heads`: 1 (the default), 2, or one per query head (None); the dynamic and the static cache
    give the logits of full recomputation, and a bad count is refused with the rule."""
    config = TransformerConfig(n_layers=2, d_model=32, n_heads=4, ffn_hidden=64, n_kv_heads=kv_heads)
    torch.manual_seed(0)
    gqa = build_transformer(config, VOCAB).eval()
    assert gqa.model.layers[0].self_attn.k_proj.out_features == (kv_heads or 4) * 32 // 4  # heads of 8
    prompts = [VOCAB.prompt([1, 2, 3]), VOCAB.prompt([4]), VOCAB.prompt([])]  # left padding needed
    ids, mask = left_pad(prompts, VOCAB.pad)
    logits = {}
    for name, cache in (("none", {"use_cache": False}), ("dynamic", {"cache_implementation": "dynamic"}),
                        ("static", {"cache_implementation": "static"})):  # fmt: skip
        out = gqa.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=VOCAB.pad, eos_token_id=None, disable_compile=True, **cache,
        )  # fmt: skip
        logits[name] = torch.stack(out.logits)
    torch.testing.assert_close(logits["dynamic"], logits["none"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["static"], logits["none"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="must be positive and divide n_heads"):
        TransformerConfig(n_heads=4, n_kv_heads=3)
