"""Text-to-image sampling with continuous image tokens: raster order, one latent per step.

    prompts `<bos> text <boi>` -> prefill -> for each of the N positions: the diffusion head samples a
    latent from the last hidden state, latent_in feeds it back as the next input (the library's KV cache)

The grammar decides what comes after `<boi>`: it must be N image ids (`SegmentGrammar.image_range`
refuses prompts that do not stand there, and in a continuous vocabulary that range is the one slot),
so the LM head is not asked inside the image; `<eoi> <eos>` follow by the grammar.

Classifier-free guidance as in `sampling.py`: each prompt is paired with the unconditional prompt
`<bos> <boi>` in one doubled batch, and the diffusion head mixes its two predictions as
u + s * (c - u) (MAR). `cfg_schedule="linear"` ramps s from 1 to `cfg_scale` over the image's
positions (MAR's linear schedule: 1 + (cfg_scale - 1) * (k + 1) / N at position k); "constant" uses
`cfg_scale` everywhere. `SamplingParams.temperature` is the diffusion head's temperature.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from unimodal.generation.sampling import SamplingParams, left_pad
from unimodal.lm.continuous import LatentHead
from unimodal.lm.grammar import SegmentGrammar
from unimodal.lm.vocab import JointVocab

CFG_SCHEDULES = ("linear", "constant")


def guidance_at(k: int, n: int, scale: float, schedule: str) -> float:
    """The guidance scale of the k-th of n image positions."""
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return 1 + (scale - 1) * (k + 1) / n
    raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")


@torch.no_grad()
def generate_latents(
    backbone,
    head: LatentHead,
    vocab: JointVocab,
    prompt_ids: list[list[int]],
    params: SamplingParams,
    cfg_schedule: str = "linear",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Joint-id prompts (each `<bos> text <boi>`) -> latent grids (B, h, w, C)."""
    device = next(backbone.parameters()).device
    b, n = len(prompt_ids), vocab.image_tokens
    guided = params.cfg_scale != 1.0
    rows = prompt_ids + [vocab.unconditional_prompt()] * b if guided else prompt_ids
    ids, mask = left_pad(rows, vocab.pad)
    SegmentGrammar(vocab).image_range(ids)  # every row stands at <boi>: N image positions come next
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp_min(0)  # left padding: each row's positions start at 0
    cache = DynamicCache(config=backbone.config)
    embeds = backbone.get_input_embeddings()(ids)
    latents = []
    for k in range(n):
        out = backbone.get_decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                                     use_cache=True)  # fmt: skip
        z = out.last_hidden_state[:, -1]  # (B or 2B, d)
        if guided:
            scale = guidance_at(k, n, params.cfg_scale, cfg_schedule)
            x = head.diffloss.sample(z[:b], temperature=params.temperature, cfg_scale=scale, z_uncond=z[b:],
                                     generator=generator)  # fmt: skip
            x = torch.cat([x, x])  # both rows of a pair continue with the same latent
        else:
            x = head.diffloss.sample(z, temperature=params.temperature, generator=generator)
        latents.append(x[:b])
        embeds = head.latent_in(x)[:, None]  # (B', 1, d)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        positions = positions[:, -1:] + 1
    return torch.stack(latents, 1).reshape(b, *vocab.image_grid, -1).cpu()  # (B, h, w, C)


@torch.no_grad()
def generate_continuous_images(backbone, head, vocab, text_tokenizer, image_tokenizer, prompts, params,
                               cfg_schedule: str = "linear") -> torch.Tensor:  # fmt: skip
    """Prompts -> images (P * images_per_prompt, 3, H, W) in [-1, 1], grouped by prompt; seeded by
    `params.seed` with a generator of its own (the caller's RNG state is untouched)."""
    if not prompts:
        raise ValueError("no prompts given")
    rows = [vocab.prompt(text_tokenizer.encode(p)) for p in prompts for _ in range(params.images_per_prompt)]
    was_training = backbone.training, head.training
    backbone.eval()
    head.eval()
    device = next(backbone.parameters()).device
    generator = torch.Generator(device=device).manual_seed(params.seed)
    images = []
    for start in range(0, len(rows), params.batch_size):
        latents = generate_latents(backbone, head, vocab, rows[start : start + params.batch_size], params,
                                   cfg_schedule, generator)  # fmt: skip
        latents = latents.to(next(image_tokenizer.parameters()).device)
        images.append(image_tokenizer.decode(latents, params.decoder).cpu())
    backbone.train(was_training[0])
    head.train(was_training[1])
    return torch.cat(images)
