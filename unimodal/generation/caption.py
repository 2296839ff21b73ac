"""Image -> text: captions from a bundle trained with both orders (`data.i2t_fraction > 0`).

The prompt is `<bos> <boi> codes <eoi>`; the grammar (with `require_caption`) lets only text ids
follow, at least one, then `<eos>` within the text budget. How well the captions name what is in
the image is measured in `unimodal.evaluation.captioning`.
"""

from __future__ import annotations

import torch

from unimodal.generation.sampling import SamplingParams, generate_ids
from unimodal.lm.grammar import SegmentGrammar


def caption_images(bundle, images: torch.Tensor, params: SamplingParams | None = None) -> list[str]:
    """Images (B, 3, H, W) in [-1, 1] at the tokenizer's resolution -> one caption each."""
    params = params or SamplingParams(greedy=True)
    vocab = bundle.vocab
    if not vocab.image_to_text:
        raise ValueError(
            "this bundle was trained text-to-image only; train with data.i2t_fraction > 0 to caption images"
        )
    if params.cfg_scale != 1.0:
        raise ValueError("cfg_scale applies to text-to-image sampling; caption with cfg_scale=1")
    grammar = SegmentGrammar(vocab, require_caption=True)
    model, tok = bundle.transformer, bundle.image_tokenizer
    was_training = model.training
    model.eval()
    captions = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(params.seed)
        for start in range(0, images.shape[0], params.batch_size):
            chunk = images[start : start + params.batch_size].to(next(tok.parameters()).device)
            rows = [vocab.caption_prompt(c) for c in tok.encode(chunk).cpu()]
            new = generate_ids(model, vocab, rows, params, vocab.max_text_tokens + 1, grammar)  # (B, T+1)
            for ids in new.tolist():
                ids = ids[: ids.index(vocab.eos)] if vocab.eos in ids else ids
                captions.append(bundle.text_tokenizer.decode([i for i in ids if i < vocab.text_size]).strip())
    model.train(was_training)
    return captions
