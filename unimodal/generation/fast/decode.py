"""The fast path's image-decoding loop, gpt-fast style: `prefill`, then `decode_one_token` compiled once.

After `<boi>` an image is exactly N steps over one id range (the codes: `SegmentGrammar.image_range`),
and <eoi> <eos> follow with no choice left, so the loop asks the grammar once and needs none of
`generate()`'s per-step machinery: the
prompts go through the model once (`prefill`, eager) into the library's `StaticCache`, then N - 1
calls of one compiled function each feed the last code and pick the next one. Every step has the
same shapes (one token per row, a mask over the whole cache), so `torch.compile` builds one graph
per (model, batch, prompt width, sampling settings) and reuses it on later calls.

Each step attends through `decode_attention`, registered with the library's `AttentionInterface`
and set on the model for the loop only: one query row per image, so each key/value head's query
heads become that head's rows of one SDPA call (the library's SDPA instead copies every cached key
and value once per query head inside a compiled graph). On CPUs the step is compiled with
inductor's C++ wrapper (`cpp_wrapper`), which calls the kernels from C++ rather than Python.

It picks what `sampling.generate_codes` picks (`NextToken`'s branch for one id range): the logits of
the codes only, guidance `u + s * (c - u)` over them, the library's warpers, and the inverse-CDF draw
with one uniform per row from the global generator, drawn outside the compiled graph (random numbers
drawn inside one come from the compiler's own generator), one call per step as the plain path makes
them, <eoi> and <eos> steps included, so the generator ends where the plain path leaves it.
"""

from __future__ import annotations

import weakref
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, StaticCache

from unimodal.generation.sampling import SamplingParams, draw_with, guide, left_pad, warpers
from unimodal.lm.grammar import SegmentGrammar

DECODE_ATTENTION = "unimodal_decode"
# model -> {(rows, prompt width, cache length, settings): compiled decode_one_token}
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The library's attention signature for one decoded token per row: query (R, H, 1, D) against the
    whole cache (R, KV, L, D) through a bool mask (R, 1, 1, L) -> (R, 1, H, D). The H / KV query heads
    that share a key/value head are its query rows (a view), so no key or value is copied: with 4 query
    heads per key/value head, batch 64, 269 cache slots, one CPU thread, 55.1 -> 17.2 ms per step
    (median of 3 interleaved calls each), the copies having cost more than SDPA and the matmuls together."""
    rows, heads, _, dim = query.shape
    grouped = query.reshape(rows, key.shape[1], heads // key.shape[1], dim)  # (R, KV, H / KV, D)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention)


def code_logits(model, hidden: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Hidden states (R, D) -> float32 logits (R, hi - lo) of ids [lo, hi) only: the head's rows for the
    codes, a third of the head's work where text ids outnumber codes two to one."""
    head = model.get_output_embeddings()
    bias = None if head.bias is None else head.bias[lo:hi]
    return F.linear(hidden, head.weight[lo:hi], bias).float()  # generate() also hands float32 to its processors


def pick(logits: torch.Tensor, u: torch.Tensor | None, b: int, scale: float, warp) -> torch.Tensor:
    """Code logits (R, K), R = b or 2b with guidance -> the next code (b, 1): guidance over the codes
    (rows [b, 2b) are the unconditional twins), then argmax (`warp` None) or the warpers and the draw."""
    if scale != 1.0:
        logits = guide(logits, b, scale)  # (b, K)
    if warp is None:
        return logits.argmax(-1, keepdim=True)
    for warper in warp:
        logits = warper(None, logits)  # the library's warpers read the scores only
    return draw_with(logits, u)


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, cache: StaticCache, lo: int, hi: int) -> torch.Tensor:
    """Left-padded prompts (R, W) and their mask -> the codes' logits at the last position (R, K);
    fills the cache's first W positions. Positions as `generate()` numbers them (padding at 0)."""
    position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position, cache=cache, use_cache=True)
    return code_logits(model, out.last_hidden_state[:, -1], lo, hi)


def decode_one_token(model, cache, token, position, pad, mask, u, b: int, lo: int, hi: int, scale: float, warp):
    """One step: the ids fed (R, 1) at `position` (R, 1), written to cache slot `position + pad` (`pad`
    (R, 1): each row's left padding) -> (the next code's id (b, 1), the ids to feed next (R, 1): the
    same id for both twins). `mask` (R, L) is the prompts' padding over the whole cache; the step
    adds the causal limit and hands the model the finished (R, 1, 1, L) mask."""
    slots = torch.arange(mask.shape[1], device=mask.device)
    mask = (mask & (slots <= position + pad))[:, None, None, :]
    out = model.get_decoder()(input_ids=token, attention_mask=mask, position_ids=position, cache=cache, use_cache=True)
    new = pick(code_logits(model, out.last_hidden_state[:, -1], lo, hi), u, b, scale, warp) + lo  # (b, 1)
    return new, (new.repeat(2, 1) if scale != 1.0 else new)


def compiled_step(model, key: tuple, device: torch.device):
    """`decode_one_token` compiled for one model and one `key` of shapes and settings, built on first use.
    Each key keeps its own compiled entries (`isolate_recompiles`): other keys never count against it.
    On CPUs inductor's C++ wrapper: batch 1 3.77 -> 3.04 ms per step (median of 9 interleaved calls on a
    busy 2-core host, one thread), batch 64 17.2 -> 15.8."""
    per_model = _COMPILED.setdefault(model, {})
    if key not in per_model:
        options = {"cpp_wrapper": True} if device.type == "cpu" else None
        per_model[key] = torch.compile(
            decode_one_token, fullgraph=True, dynamic=False, isolate_recompiles=True, options=options
        )
    return per_model[key]


def skip_guards():
    """Steps after the first of one call run without dynamo's guard checks: they hand the compiled step
    inputs of the first one's shapes, dtypes and objects (the same model and cache), so every check
    would pass. Batch 1: 2.52 -> 1.97 ms per step, batch 64: 10.77 -> 10.49 (median of 7 interleaved
    calls each, 2-core CPU, two threads, same codes). It sets the default stance for that while: a
    caller's other stance (e.g. `force_eager`) does not apply inside the loop."""
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


@contextmanager
def attention(model, name: str):
    """The model attends with the registered function `name` for a while, then with its own again."""
    own = model.config._attn_implementation  # the library has no public getter
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(own)


@torch.no_grad()
def generate_codes_fast(model, vocab, prompt_ids: list[list[int]], params: SamplingParams) -> torch.Tensor:
    """Joint-id prompts (each `<bos> text <boi>`) -> code grids (B, h, w), the contract of
    `sampling.generate_codes`, with the same codes for the same seed (up to float rounding)."""
    if params.kv_cache != "static":
        raise ValueError(f"the fast path decodes on a static cache (got cache={params.kv_cache!r}); use the plain path")
    if not prompt_ids:
        raise ValueError("no prompts given")
    device = next(model.parameters()).device
    b, n = len(prompt_ids), vocab.image_tokens
    scale = float(params.cfg_scale)
    rows = prompt_ids + [vocab.unconditional_prompt()] * b if scale != 1.0 else prompt_ids
    ids, prompt_mask = left_pad(rows, vocab.pad)
    # the codes' range, from the grammar (which refuses prompts that do not end with <boi>)
    lo, hi = SegmentGrammar(vocab).image_range(ids)
    ids, prompt_mask = ids.to(device), prompt_mask.to(device)
    width, length = ids.shape[1], ids.shape[1] + n - 1  # the last code is drawn, never fed
    # (R, L): the prompts' padding, then every position still to come (the causal mask hides the future)
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(len(rows), length - width)], 1).bool()
    cache = StaticCache(config=model.config, max_cache_len=length)
    warp = warpers(params)

    def uniforms() -> torch.Tensor | None:  # one call per step, as `sampling.draw` makes it
        return None if warp is None else torch.rand((b, 1), dtype=torch.float64, device=device)

    new = pick(prefill(model, ids, prompt_mask, cache, lo, hi), uniforms(), b, scale, warp) + lo
    feed = new.repeat(2, 1) if scale != 1.0 else new
    out = [new]
    if n > 1:
        settings = (scale, None if warp is None else (params.temperature, params.top_k, params.top_p))
        step = compiled_step(model, (len(rows), width, length, lo, hi, settings), device)
        position = prompt_mask.sum(-1, keepdim=True)  # (R, 1): each row's first code position
        pad = width - position  # (R, 1)
        with attention(model, DECODE_ATTENTION), ExitStack() as later_steps:
            for i in range(n - 1):
                new, feed = step(model, cache, feed, position + i, pad, mask, uniforms(), b, lo, hi, scale, warp)
                out.append(new)
                if i == 0:  # the first step checked every guard (compiling if the key is new): see `skip_guards`
                    later_steps.enter_context(skip_guards())
    for _ in range(2):  # the plain path's <eoi> and <eos> steps draw too: leave the generator where it does
        uniforms()
    return vocab.ids_to_codes(torch.cat(out, 1).cpu())  # (B, N) image ids -> (B, h, w)
