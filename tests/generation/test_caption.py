"""Image -> text: captions from a bundle whose vocabulary allows the image-first order."""

from dataclasses import replace

import pytest
import torch

from unimodal.generation.bundle import Bundle
from unimodal.generation.caption import caption_images
from unimodal.generation.sampling import SamplingParams


def test_captions_need_a_vocabulary_with_both_orders_and_are_text(bundle):
    with pytest.raises(ValueError, match="i2t_fraction"):
        caption_images(bundle, torch.zeros(1, 3, 32, 32))
    both = Bundle(bundle.text_tokenizer, bundle.image_tokenizer, replace(bundle.vocab, image_to_text=True),
                  bundle.transformer)  # fmt: skip
    r = bundle.image_tokenizer.config.resolution
    images = torch.rand(3, 3, r, r) * 2 - 1
    captions = caption_images(both, images, SamplingParams(seed=0))
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    assert caption_images(both, images, SamplingParams(seed=0)) == captions  # seeded
    with pytest.raises(ValueError, match="cfg_scale"):
        caption_images(both, images, SamplingParams(cfg_scale=2.0))
