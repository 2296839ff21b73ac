"""Image -> text: captions from a bundle trained with both orders (`data.i2t_fraction > 0`).

The prompt is `<bos> <boi> codes <eoi>`; the grammar (with `require_caption`) lets only text ids
follow, at least one, then `<eos>` within the text budget. Captioning accuracy on the built-in
shapes splits parses colour, shape, size and position back out of each caption and scores it
exactly like the judge scores generated images (`judge.scene_match`).
"""

from __future__ import annotations

import torch

from .data import COLORS, POSITIONS, SHAPES, SIZES, DataSource, ShapesConfig, images_to_tensor, load_pairs
from .grammar import SegmentGrammar
from .judge import scene_labels, scene_match
from .sampling import SamplingParams, generate_ids


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


def parse_caption(caption: str) -> dict[str, list[str]]:
    """A shapes caption -> {colors, shapes, sizes, positions} lists, one entry per object clause.

    Clauses are split on " and "; a clause without a recognisable colour, shape and position is
    dropped (size defaults to "small" when missing), so a garbled caption scores as wrong.
    """
    parsed = {"colors": [], "shapes": [], "sizes": [], "positions": []}
    for clause in caption.lower().split(" and "):
        words = clause.replace(",", " ").replace(":", " ").split()
        color = next((w for w in words if w in COLORS), None)
        shape = next((w for w in words if w in SHAPES), None)
        size = next((w for w in words if w in SIZES), "small")
        position = next((p for p in POSITIONS if p in " ".join(words)), None)
        if color and shape and position:
            for key, value in zip(parsed, (color, shape, size, position)):
                parsed[key].append(value)
    return parsed


def captioning_accuracy(
    bundle, split: str, num_images: int = 200, params: SamplingParams | None = None, shapes: ShapesConfig | None = None
) -> dict:
    """Caption the split's real images; fraction whose caption names every object right (scene),
    and per attribute (colour, shape, position of every object; size)."""
    resolution = bundle.image_tokenizer.config.resolution
    shapes = shapes or ShapesConfig(resolution=resolution)
    ds = load_pairs(DataSource(name="shapes", shapes=shapes), split)
    rows = [ds[i] for i in range(min(num_images, len(ds)))]
    captions = caption_images(bundle, images_to_tensor([r["image"] for r in rows], resolution), params)
    truth, pred = scene_labels(rows), scene_labels([parse_caption(c) for c in captions])
    match = scene_match(pred, truth)
    size = (pred["size"] == truth["size"]).all(1)
    rates = {k: float(v.float().mean()) for k, v in match.items()}
    return {
        "split": split,
        "num_images": len(rows),
        "caption_accuracy": rates.pop("scene"),
        "accuracy_by_attribute": {**rates, "size": float(size.float().mean())},
        "examples": [{"truth": r["text"], "caption": c} for r, c in zip(rows[:8], captions[:8])],
    }
