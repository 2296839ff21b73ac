"""Next-scale sampling (VAR): one forward per scale with the library's KV cache.

    prefill   prompts `<bos> text <boi>` (left-padded, causal)   -> logits of scale 1 (one code)
    scale k   s_k^2 queries: scale k-1's drawn codes, nearest-upsampled, + level k's embedding,
              attending to the cache and to each other (a 4-D mask)  -> logits of all s_k^2 codes at once

Per scale, the logits over the code range (the grammar's `image_range`) are guided, warped (the library's
temperature / top-k / top-p warpers, as the raster path builds them) and drawn independently per position.
Guidance follows VAR: the scale ramps linearly with the scale index, from 1 (none) at the first scale to
`cfg_scale` at the last, mixing conditional rows with their `<bos> <boi>` twins (`sampling.guide`); a row
and its twin feed back the same codes. The forward of a step is the one `lm.next_scale.forward` computes
for the whole sequence at once (tested equal), so training and sampling see the same mask and inputs.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from unimodal.generation.sampling import SamplingParams, draw, guide, left_pad, warpers
from unimodal.lm.grammar import SegmentGrammar
from unimodal.lm.next_scale import ScaleLayout, block_causal_mask, embed, position_ids
from unimodal.lm.vocab import JointVocab


def guidance_ramp(cfg_scale: float, k: int, levels: int) -> float:
    """The guidance scale at scale k of `levels`: 1 at the first, `cfg_scale` at the last."""
    return 1.0 + (cfg_scale - 1.0) * (k / (levels - 1) if levels > 1 else 1.0)


def scale_logits(model, vocab: JointVocab, prompt_ids: list[list[int]], choose):
    """The scale-by-scale loop: prompts (each ending with <boi>) -> for each scale k, `choose(k, logits)`
    with logits (B, s_k^2, V) of the rows' next codes; it returns the joint ids (B, s_k^2) to feed back.
    Returns the chosen ids of every scale, concatenated (B, N)."""
    device = next(model.parameters()).device
    layout = ScaleLayout(vocab)
    ids, att = (t.to(device) for t in left_pad(prompt_ids, vocab.pad))
    blocks = torch.arange(ids.shape[1], device=device).expand_as(ids)  # the prompt: causal
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=block_causal_mask(blocks, att), position_ids=position_ids(att),
                cache=cache, use_cache=True)  # fmt: skip
    logits = out.logits[:, -1:]  # (B, 1, V): the first scale's one code
    keys, next_pos = att.bool(), position_ids(att)[:, -1:] + 1
    chosen = []
    for k, s in enumerate(layout.scales):
        if k > 0:
            queries = layout.upsample(chosen[-1], k)  # (B, s^2)
            levels = torch.full_like(queries, vocab.level(k))
            keys = torch.cat([keys, keys.new_ones(queries.shape)], 1)  # a block sees the cache and itself
            mask = keys[:, None, None, :].expand(-1, 1, s * s, -1)
            pos = next_pos + torch.arange(s * s, device=device)
            out = model(inputs_embeds=embed(model, queries, levels), attention_mask=mask, position_ids=pos,
                        cache=cache, use_cache=True)  # fmt: skip
            logits, next_pos = out.logits, next_pos + s * s
        chosen.append(choose(k, logits))
    return torch.cat(chosen, 1)


@torch.no_grad()
def generate_codes_next_scale(model, vocab: JointVocab, prompt_ids: list[list[int]], params: SamplingParams):
    """Joint-id prompts (each `<bos> text <boi>`) -> codes (B, N), the scales concatenated coarse to fine."""
    if params.compile or not params.use_cache:
        raise ValueError("next-scale sampling has one path: the dynamic KV cache (no compile, use_cache=True)")
    b = len(prompt_ids)
    guided = params.cfg_scale != 1.0
    rows = prompt_ids + [vocab.unconditional_prompt()] * b if guided else prompt_ids
    lo, hi = SegmentGrammar(vocab).image_range(left_pad(rows, vocab.pad)[0])  # refuses prompts not at <boi>
    warp = warpers(params)
    levels = len(vocab.image_scales)

    def choose(k: int, logits: torch.Tensor) -> torch.Tensor:
        part = logits[..., lo:hi].float()  # (R, n, K): the codes, the only ids the grammar allows here
        if guided:
            part = guide(part, b, guidance_ramp(params.cfg_scale, k, levels))  # (B, n, K)
        n = part.shape[1]
        flat = part.reshape(-1, hi - lo)  # every position of the scale drawn independently
        if warp is None:
            token = flat.argmax(-1, keepdim=True)
        else:
            for w in warp:
                flat = w(None, flat)
            token = draw(flat)
        token = token.view(-1, n) + lo  # (B, n) joint ids
        return token.repeat(2, 1) if guided else token

    return vocab.ids_to_codes(scale_logits(model, vocab, rows, choose)[:b].cpu())
