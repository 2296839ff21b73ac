"""How much a bundle's images depend on their captions, without sampling.

The teacher-forced image loss of real pairs with their own captions, against the same images with the
captions moved one place along a seeded permutation (no image keeps its own). A model that draws what
the caption says loses much more with the wrong caption; a ratio near 1 means the image half ignores
the text, whatever the samples look like. Deterministic for a seed: both passes draw the same noise.

    discrete codes (raster or next-scale)   cross-entropy over each image position's allowed codes
    continuous tokens                       the diffusion head's loss, `draws` (step, noise) pairs per token

The two losses are on different scales, so compare the ratio across kinds of model, never the losses.
The ratio is per image token: where most of an image's loss is detail no caption decides (real
pictures, many tokens), it stays near 1 even for a model that reads the caption. For codes the loss is
in nats, so `shuffled_minus_own_nats_per_image` (the difference times the image's tokens) says what a
wrong caption costs per image, comparable across token counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unimodal.generation.bundle import Bundle
from unimodal.lm import next_scale
from unimodal.lm.continuous import latent_conditions, slot_grid
from unimodal.lm.grammar import SegmentGrammar
from unimodal.lm.transformer import sequence_loss
from unimodal.lm.vocab import right_pad


def caption_dependence(
    bundle: Bundle, images: torch.Tensor, captions: list[str], seed: int = 0, batch_size: int = 64, draws: int = 8
) -> dict[str, float] | None:
    """images (B, 3, R, R) in [-1, 1] with their captions -> the image loss with own and with shuffled
    captions, their ratio (`shuffled_over_own`) and, for codes, their difference in nats per image;
    None for a single pair (nothing to shuffle)."""
    if len(captions) != images.shape[0]:
        raise ValueError(f"need one caption per image, got {images.shape[0]} images and {len(captions)} captions")
    if len(captions) < 2:
        return None
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = list(captions)
    for i, j in zip(order, order[1:] + order[:1]):  # each image takes the caption of the next in the cycle
        shuffled[i] = captions[j]
    own = _image_loss(bundle, images, captions, seed, batch_size, draws)
    other = _image_loss(bundle, images, shuffled, seed, batch_size, draws)
    result = {"image_loss": own, "image_loss_shuffled_captions": other, "shuffled_over_own": other / max(own, 1e-12)}
    if bundle.image_head is None:  # cross-entropy in nats per token
        result["shuffled_minus_own_nats_per_image"] = (other - own) * bundle.vocab.image_tokens
    return result


@torch.no_grad()
def _image_loss(bundle: Bundle, images, captions, seed: int, batch_size: int, draws: int) -> float:
    vocab, model = bundle.vocab, bundle.transformer
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)  # the same draws for every caption set
    total, count = 0.0, 0
    for start in range(0, len(captions), batch_size):
        pixels = images[start : start + batch_size].to(next(bundle.image_tokenizer.parameters()).device)
        tokens = bundle.image_tokenizer.encode(pixels).to(device)  # codes, or latents (B, h, w, C)
        texts = bundle.text_tokenizer.encode_batch(captions[start : start + batch_size])
        continuous = bundle.image_head is not None  # the sequence holds slots, the latents go in beside it
        grids = [slot_grid(vocab).view(*vocab.image_grid)] * len(texts) if continuous else tokens
        ids, mask = right_pad([vocab.text_to_image_sequence(t, g) for t, g in zip(texts, grids)], vocab.pad)
        ids, mask = ids.to(device), mask.to(device)
        if continuous:
            s, n = _diffusion_loss(model, bundle.image_head, vocab, ids, mask, tokens.flatten(1, 2), generator, draws)
        else:
            logits = next_scale.teacher_forced_logits(model, vocab, ids, mask)
            _, parts = sequence_loss(logits, ids, mask, SegmentGrammar(vocab), {"image": 1.0}, True)
            s, n = (float(v) for v in parts["image"])
        total, count = total + s, count + n
    model.train(was_training)
    return total / max(count, 1)


def _diffusion_loss(backbone, head, vocab, ids, mask, latents, generator, draws: int) -> tuple[float, int]:
    """Summed denoising loss over every latent (`draws` per latent) and the count."""
    head.eval()
    z, _ = latent_conditions(backbone, head, vocab, ids, mask, latents)
    target = latents.flatten(0, 1).to(z.dtype)
    total = 0.0
    for _ in range(draws):
        noise = torch.randn(target.shape, generator=generator, device=target.device, dtype=target.dtype)
        x_t, t, goal = head.diffloss.process.training_example(target, noise, generator=generator)
        total += float(F.mse_loss(head.diffloss.net(x_t, t, z), goal, reduction="none").mean(-1).sum())
    return total, draws * target.shape[0]
