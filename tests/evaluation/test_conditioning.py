"""Caption dependence: the teacher-forced image loss with own against shuffled captions. A model taught to
draw each caption's image loses much more with the wrong caption, an untrained one about the same; with
identical captions both passes are the same computation (the same noise draws for continuous tokens),
so the ratio is exactly 1."""

import torch

from tests.generation.test_continuous import continuous_bundle
from unimodal.evaluation.conditioning import caption_dependence
from unimodal.lm.grammar import SegmentGrammar
from unimodal.lm.transformer import sequence_loss
from unimodal.lm.vocab import right_pad

CAPTIONS = ["a large red circle at the top left", "a small blue square at the bottom right",
            "a large green triangle at the top right", "a small yellow cross at the bottom left"]  # fmt: skip


def _images(n: int, resolution: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _teach(bundle, images, captions, steps: int = 60):
    """Train the bundle's transformer (in place) to draw each image's codes after its caption."""
    vocab, model = bundle.vocab, bundle.transformer
    codes = bundle.image_tokenizer.encode(images)
    rows = [vocab.text_to_image_sequence(bundle.text_tokenizer.encode(c), k) for c, k in zip(captions, codes)]
    ids, mask = right_pad(rows, vocab.pad)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss, _ = sequence_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask,
                                SegmentGrammar(vocab), {"image": 1.0}, True)  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_a_model_taught_to_follow_captions_depends_on_them_and_an_untrained_one_does_not(tiny_bundle):
    from unimodal.generation.bundle import Bundle

    bundle = Bundle.load(tiny_bundle)  # a copy of its own: the test trains it
    images = _images(len(CAPTIONS), bundle.image_tokenizer.config.resolution)
    before = caption_dependence(bundle, images, CAPTIONS)
    assert 0.8 < before["shuffled_over_own"] < 1.25
    torch.manual_seed(0)
    _teach(bundle, images, CAPTIONS)
    after = caption_dependence(bundle, images, CAPTIONS)
    assert after["image_loss"] < before["image_loss"] / 2
    assert after["shuffled_over_own"] > 3
    gap = after["image_loss_shuffled_captions"] - after["image_loss"]
    assert after["shuffled_minus_own_nats_per_image"] == gap * bundle.vocab.image_tokens
    assert after == caption_dependence(bundle, images, CAPTIONS)  # deterministic


def test_identical_captions_give_a_ratio_of_exactly_one_for_codes_and_for_continuous_tokens(bundle):
    for b in (bundle, continuous_bundle("ddpm"), continuous_bundle("flow")):
        images = _images(6, b.image_tokenizer.config.resolution, seed=1)
        result = caption_dependence(b, images, ["a red circle"] * 6, batch_size=4)
        assert result["shuffled_over_own"] == 1.0 and result["image_loss"] > 0
        assert result.get("shuffled_minus_own_nats_per_image", 0.0) == 0.0  # only for codes, in nats


def test_shuffled_captions_change_a_continuous_models_loss_deterministically():
    b = continuous_bundle("flow")
    images = _images(4, b.image_tokenizer.config.resolution, seed=2)
    captions = ["a red circle", "a blue square", "a green triangle", "a red square"]
    first = caption_dependence(b, images, captions, seed=3)
    assert first == caption_dependence(b, images, captions, seed=3)
    assert first["image_loss"] != first["image_loss_shuffled_captions"]


def test_a_caption_count_mismatch_is_refused_and_a_single_pair_has_nothing_to_shuffle(bundle):
    import pytest

    with pytest.raises(ValueError, match="one caption per image"):
        caption_dependence(bundle, _images(3, 32), ["a"] * 2)
    assert caption_dependence(bundle, _images(1, 32), ["a red circle"]) is None
