"""Text-to-image sampling with `model.generate()` and the grammar as a LogitsProcessor.

Functions take the plain modules (transformer, vocab, tokenizers) and return tensors; no
Lightning involved. Every sample is a full image: the grammar forces exactly N image codes.

Classifier-free guidance (Janus/LlamaGen style): each prompt's row is paired with an unconditional
row (`<bos> <boi>`, the empty caption the model saw under caption dropout) in one doubled batch, so
one forward pass (and the library's KV cache) serves both. `NextToken` mixes the two
rows' log-probabilities as `u + s * (c - u)` - the formula of transformers'
`UnbatchedClassifierFreeGuidanceLogitsProcessor`, which `generate(guidance_scale=s,
negative_prompt_ids=...)` reaches with a second, separate forward pass - and picks one token for
both rows.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import (
    AttentionInterface,
    CompileConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from .data import tensor_to_image
from .grammar import GrammarLogitsProcessor, SegmentGrammar

CACHES = ("dynamic", "static")
# Compiled decoding (both are switches for A/B measurements; see experiments/generation/results.md):
SKIP_GUARDS = True  # check dynamo's guards at the first compiled step of a call only (`GuardSkip`)
# From this many rows (prompts, doubled by CFG) a compiled forward on the CPU attends through
# `filled_cache_attention`; below, a call out of the graph costs more than the unfilled cache it skips
# (2-core CPU, default model, 256-token images, ms/step with the attention written out in the graph
# (`compiled_packed_attention`) vs the operator, one process each: batch 8 0.890 vs 1.006, 16 1.467 vs
# 1.540, 24 1.808 vs 1.709, 32 2.437 vs 2.246; batch 64 4.98 vs 4.34 with SDPA in the graph).
# Not used on GPUs (unmeasured there; finding the filled length syncs the device every layer).
COMPILED_LIVE_MIN_ROWS = 17


@dataclass
class SamplingParams:
    """How to sample. `cfg_scale` 1 is no guidance; `cache` picks the library's KV cache: "static"
    (the default: preallocated, attended over its filled part, and the one `compile` can
    torch.compile) or "dynamic" (grows by one position per step); `use_cache=False` recomputes the
    whole prefix at every step (for comparisons)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    seed: int = 0
    images_per_prompt: int = 1
    batch_size: int = 64
    use_cache: bool = True
    cfg_scale: float = 1.0
    cache: str | None = None  # None: "static" when use_cache
    compile: bool = False

    def __post_init__(self):
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0 (got {self.temperature}); use greedy for argmax")
        if self.top_k is not None and (type(self.top_k) is not int or self.top_k <= 0):
            raise ValueError(f"top_k must be a positive integer (got {self.top_k!r}); leave it unset to disable")
        if self.top_p is not None and not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p}); leave it unset to disable")
        for name in ("images_per_prompt", "batch_size", "seed"):
            value = getattr(self, name)
            if type(value) is not int or value < (0 if name == "seed" else 1):
                raise ValueError(f"{name} must be an integer >= {0 if name == 'seed' else 1} (got {value!r})")
        if not (isinstance(self.cfg_scale, int | float) and math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise ValueError(f"cfg_scale must be a finite number >= 0 (got {self.cfg_scale}); 1 turns guidance off")
        if self.cache is not None and self.cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES} (got {self.cache!r})")
        if not self.use_cache and (self.cache is not None or self.compile):
            raise ValueError("cache and compile need use_cache=True")
        if self.compile and self.kv_cache != "static":
            raise ValueError("compile needs cache='static' (a compiled forward needs fixed shapes)")

    @property
    def kv_cache(self) -> str | None:
        """The cache generate() uses: "static", "dynamic", or None (no cache)."""
        return (self.cache or "static") if self.use_cache else None


class NextToken(LogitsProcessor):
    """The whole choice of the next id as one processor: guidance (over a doubled batch), the
    grammar, the library's temperature/top-k/top-p warpers, and the draw.

    With guidance, rows [0, B) are conditional and [B, 2B) their unconditional twins: both get the
    same scores, so a row and its twin always append the same id. When sampling, it draws the id
    itself (`draw`) and returns `one_hot_scores`, so `generate()` runs greedy and appends exactly
    that id. One processor rather than a list: `generate()` inspects every processor's signature at
    every step (20 us each, 3% of a compiled batch-1 step).
    """

    def __init__(self, grammar: SegmentGrammar, params: SamplingParams, on_step=None):
        self.scale = params.cfg_scale
        self.grammar = GrammarLogitsProcessor(grammar)
        self.warpers = warpers(params)  # None: greedy
        self.on_step = on_step  # called once per step (`GuardSkip.step`)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.on_step is not None:
            self.on_step()
        guided = self.scale != 1.0
        b = input_ids.shape[0] // 2 if guided else input_ids.shape[0]
        states = self.grammar.step(input_ids[:b])
        if self.warpers is not None and self.grammar.support is not None:
            # every row's allowed ids lie in one range (an image's codes): guide, warp and draw over it
            # alone, the same distribution (the ids outside have probability 0) for a third of the work.
            # Guidance mixes the logits there: log-probabilities differ from them by one constant per
            # row (the log of the softmax's sum), and no warper or draw changes with such a constant.
            lo, hi = self.grammar.support
            part = scores[:, lo:hi]
            if guided:
                part = part[b:] + self.scale * (part[:b] - part[b:])
            token = self.sample(input_ids[:b], part.contiguous()) + lo  # softmax over a strided view: 2x the cost
            return one_hot_scores(scores, token.repeat(2, 1) if guided else token)
        if guided:
            cond, uncond = scores[:b].log_softmax(-1), scores[b:].log_softmax(-1)  # (B, V) each
            scores = uncond + self.scale * (cond - uncond)
        scores = self.grammar.mask(states, scores)
        if self.warpers is not None:
            scores = one_hot_scores(scores, self.sample(input_ids[:b], scores))
        return torch.cat([scores, scores]) if guided else scores

    def sample(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        """The library's warpers, then one draw per row: (B, V) -> (B, 1) column indices of `scores`."""
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        return draw(scores)


def draw(scores: torch.Tensor) -> torch.Tensor:
    """One id per row from softmax(scores): (B, V) -> (B, 1), by inverse CDF with one uniform per row.

    What `generate(do_sample=True)` does with `torch.multinomial`, whose CPU kernel draws an
    exponential variate for every vocabulary entry: 1.4 ms per step at batch 64 x 1540 ids, 14% of a
    cached decoding step, against 0.05 ms here. Ids with probability 0 (-inf scores) are never drawn:
    their CDF step is empty, and u * total < total for every double u in [0, 1).
    """
    cdf = scores.softmax(-1).cumsum(-1, dtype=torch.float64)  # (B, V), non-decreasing
    total = cdf[:, -1:]
    u = torch.rand(total.shape, dtype=torch.float64, device=scores.device) * total
    return torch.searchsorted(cdf, u, right=True)  # first id whose CDF exceeds u


def one_hot_scores(scores: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Scores that make greedy decoding pick `token` (B, 1): 0 there, -inf elsewhere (a new tensor)."""
    return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def warpers(params: SamplingParams) -> LogitsProcessorList | None:
    """The library's temperature/top-k/top-p warpers, as `generate()` would build them (None = greedy)."""
    if params.greedy:
        return None
    out = LogitsProcessorList()
    if params.temperature != 1.0:
        out.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k is not None:
        out.append(TopKLogitsWarper(params.top_k))
    if params.top_p is not None and params.top_p < 1.0:
        out.append(TopPLogitsWarper(params.top_p))
    return out


LIVE_SDPA = "unimodal_live_sdpa"


def decode_sdpa_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0, **kwargs):
    """The library's `sdpa_mask`, built in two operations when decoding one causal token.

    Key j may be attended iff j <= q_offset and the prompts' padding mask (None: no padding) allows
    it: a (B, 1, 1, L) bool mask of zeros with keys 0..q_offset set from the padding mask - what
    `sdpa_mask` computes through its general index machinery in 30 us at batch 1 (4% of a compiled
    batch-1 step) and 94 us at batch 64, against 7-8 us. Anything else (prompts, other mask functions,
    local attention, a mask `sdpa_mask` may skip) goes to `sdpa_mask`.
    """
    padding, device = kwargs.get("attention_mask"), torch.device(kwargs.get("device", "cpu"))
    if (
        q_length == 1
        and kv_offset == 0
        and kwargs.get("mask_function", causal_mask_function) is causal_mask_function
        and kwargs.get("local_size") is None
        and not kwargs.get("allow_is_causal_skip", True)
        and (padding is None or padding.dim() == 2)
        and device.type == "cpu"  # int(q_offset) would sync a GPU
        and not torch.compiler.is_compiling()
    ):
        filled = min(int(q_offset) + 1, kv_length)
        mask = torch.zeros(batch_size, 1, 1, kv_length, dtype=torch.bool, device=device)
        if padding is None:
            mask[..., :filled] = True
        else:
            filled = min(filled, padding.shape[1])
            mask[:, 0, 0, :filled] = padding[:, :filled].bool()
        return mask
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset, **kwargs)


def _decode_packed(query: torch.Tensor, kv_heads: int, attend) -> torch.Tensor:
    """One decoded token's attention with the query heads that share a key/value head as that head's
    query rows (flash-attention's `pack_gqa`, a view): query (B, H, 1, D) -> `attend` on (B, KV, H/KV, D)
    -> the library's attention layout (B, 1, H, D)."""
    b, heads, _, dim = query.shape
    out = attend(query.reshape(b, kv_heads, heads // kv_heads, dim))
    return out.reshape(b, heads, 1, dim).transpose(1, 2).contiguous()


def packed_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The library's SDPA attention, except one decoded token with fewer key/value heads than query heads:
    packed query heads (`_decode_packed`). Given a mask, the library instead copies every cached key and
    value once per query head (`repeat_kv`): 4x the cache written and read again per layer and step with
    one key/value head of four. Same result up to float rounding (SDPA over the same keys, rows regrouped)."""
    if query.shape[2] == 1 and query.shape[1] > key.shape[1] and dropout == 0.0:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        out = _decode_packed(  # the mask (B or 1, 1, 1, L) broadcasts over each key/value head's rows
            query, key.shape[1], lambda q: sdpa(q, key, value, attn_mask=attention_mask, scale=scaling)
        )
        return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def live_sdpa_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0, **kwargs):
    """The library's SDPA mask, over the filled part of a static cache only when decoding one token.

    A static cache hands the mask (and attention) its whole preallocated length - prompt and every
    token still to come - so SDPA would read all of it at every step: on average twice the filled
    length while drawing an image, and reading the cache is what a batch-64 step waits on. Decoding
    the token at position `q_offset` fills keys 0..q_offset, so the mask stops there and
    `live_sdpa_attention` cuts keys and values to the mask's length. Eager decoding only: a length
    that changes every step would recompile a fixed-shape compiled graph.
    """
    if q_length == 1 and kv_offset == 0 and not torch.compiler.is_compiling():
        kv_length = min(kv_length, int(q_offset) + 1)
    return decode_sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset, **kwargs)


def live_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """The library's SDPA attention over the keys the mask covers: a `live_sdpa_mask` mask shorter
    than the static cache drops its unfilled tail (the library's own masks always span every key).
    Decoding a batch without padding, the mask allows every key it covers and is dropped (`decoding_mask`)."""
    if attention_mask is not None and attention_mask.shape[-1] < key.shape[-2]:
        live = attention_mask.shape[-1]
        key, value = key[:, :, :live], value[:, :, :live]
    if query.shape[2] == 1 and attention_mask is not None and attention_mask.dtype == torch.bool:
        if decoding_mask(attention_mask) == (key.shape[-2], True):
            attention_mask = None
    return packed_sdpa_attention(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(LIVE_SDPA, live_sdpa_attention)
AttentionMaskInterface.register(LIVE_SDPA, live_sdpa_mask)


def _filled_cache_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """One decoding step's SDPA over the filled part of a static cache, as one operator a compiled graph
    calls with fixed shapes: query (B, H, 1, D), keys/values (B, KV, L, D) and the library's bool mask
    (B or 1, 1, 1, L) over the whole cache -> (B, H, 1, D).

    Every row decodes the same position p (left padding), which is the last key row 0 may attend to,
    so keys p+1.. are unfilled for all rows and are cut; query heads sharing a key/value head are packed
    as its rows (the library's `pack_gqa`, never `repeat_kv`). Opaque to the compiler: the length it
    reads changes every step, and the graph around it keeps its one shape.
    """
    live, dense = decoding_mask(mask)
    b, heads, _, dim = query.shape
    groups = heads // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(b, key.shape[1], groups, dim),
        key[:, :, :live],
        value[:, :, :live],
        attn_mask=None if dense else mask[..., :live],
        scale=scale,
    )
    return out.reshape(b, heads, 1, dim)


_LAST_MASK = (None, 0, (0, False))  # (weak reference to a mask, its version, what `decoding_mask` found)


def decoding_mask(mask: torch.Tensor) -> tuple[int, bool]:
    """What a decoding step's bool mask (B or 1, 1, 1, L) says: (live, dense) - keys from `live` on are
    masked for row 0 (the unfilled part of a static cache: every row decodes the same position), and
    `dense` if every row may attend to every key before it (no padding), so SDPA needs no mask.

    Every layer of a step gets the same mask object, so it is read at the first layer only (its five
    small operations were repeated per layer); a new mask, or this one changed in place since (its
    version counter moved), is read again; a mask made under `torch.inference_mode` has no version
    counter and is read at every layer. Without a mask SDPA adds nothing to the scores: 116 vs 131 us
    per call at batch 64 over 142 keys (timed alone).
    """
    global _LAST_MASK
    tracked = not mask.is_inference()  # a tensor made under inference_mode has no version counter
    ref, version, facts = _LAST_MASK
    if tracked and ref is not None and ref() is mask and mask._version == version:
        return facts
    row = mask[0, 0, 0]
    live = row.shape[0] - int(row.view(torch.uint8).flip(0).argmax())  # last attended key + 1
    facts = (live, bool(mask[..., :live].all()))
    if tracked:
        _LAST_MASK = (weakref.ref(mask), mask._version, facts)
    return facts


# Registered through `torch.library.Library` rather than the `custom_op` decorator: the decorator's
# Python autograd and dispatch layers cost 7-13 us per call (4 calls per decoding step), the plain
# registration ~2 us over the function itself. Inference only: it has no backward (decoding runs under
# no_grad). A FRAGMENT, defined once, so that reloading this module (autoreload) does not fail.
_OPS = torch.library.Library("unimodal", "FRAGMENT")
if not hasattr(torch.ops.unimodal, "filled_cache_attention"):
    _OPS.define("filled_cache_attention(Tensor query, Tensor key, Tensor value, Tensor mask, float? scale) -> Tensor")
    _OPS.impl("filled_cache_attention", _filled_cache_attention, "CompositeExplicitAutograd")
    torch.library.register_fake("unimodal::filled_cache_attention", lib=_OPS)(
        lambda query, key, value, mask, scale: query.new_empty(query.shape)  # contiguous, as the real output
    )
filled_cache_attention = torch.ops.unimodal.filled_cache_attention


def compiled_live_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The library's SDPA attention, except decoding one token with a mask: `filled_cache_attention`,
    which assumes left padding (every row decodes the same position, as `left_pad` + `generate()` give)."""
    if query.shape[2] == 1 and attention_mask is not None and attention_mask.dtype == torch.bool:
        out = filled_cache_attention(query, key, value, attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None
    return packed_sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def compiled_packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Compiled decoding below `COMPILED_LIVE_MIN_ROWS`: one decoded token's attention over packed query
    heads written out (scores, mask, softmax, weighted sum), which inductor compiles into its own fused
    kernels. SDPA's CPU kernel is one call per layer whose fixed costs dominate at a few rows: batch 1
    0.563 / 0.537 / 0.600 -> 0.487 / 0.499 / 0.560 ms per step (process pairs, same codes); batch 4 a
    wash. A decoding row always attends to its own position, so no row's softmax is all -inf."""
    if query.shape[2] == 1 and dropout == 0.0 and attention_mask is not None and attention_mask.dtype == torch.bool:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5

        def attend(q):  # (B, KV, groups, D); mask (B, 1, 1, L)
            scores = torch.matmul(q, key.transpose(-1, -2)) * scale
            return torch.matmul(scores.masked_fill(~attention_mask, float("-inf")).softmax(-1), value)

        return _decode_packed(query, key.shape[1], attend), None
    return packed_sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


COMPILED_LIVE_SDPA = "unimodal_compiled_live_sdpa"  # fixed-shape masks over the whole cache
AttentionInterface.register(COMPILED_LIVE_SDPA, compiled_live_attention)
AttentionMaskInterface.register(COMPILED_LIVE_SDPA, decode_sdpa_mask)
COMPILED_SDPA = "unimodal_compiled_sdpa"  # attention written out over the whole cache, the mask built in two operations
AttentionInterface.register(COMPILED_SDPA, compiled_packed_attention)
AttentionMaskInterface.register(COMPILED_SDPA, decode_sdpa_mask)


@contextmanager
def attention_implementation(model, name: str):
    """Run the model with another registered attention function for a while (the saved config keeps
    its own: a bundle loads with plain SDPA and no project code)."""
    old = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = old


# On CPUs, a compiled decoding step's matrix products with at most this many rows (prompts x CFG) become
# inductor's own fused reduction kernels (its `decompose_mm_pass`) instead of one BLAS call per product:
# 29 single-threaded calls per step become a few fused kernels (as fast on one thread as on two at
# batch 1: the calls were the cost, not the arithmetic). Process pairs, 2-core CPU,
# default model, ms per step plain -> decomposed: batch 1 0.635/0.561 -> 0.501/0.480, 2 0.78/0.75 ->
# 0.62/0.61, 4 1.00/0.86 -> 0.65/0.65, 8 1.35/1.15 -> 0.90/0.90, 16 1.34/1.45 -> 1.27/1.15, 32 2.25/2.25
# -> 2.12/1.98. At 64 and 128 rows the BLAS calls are as fast while the host is quiet but not when it
# is busy: two copies of the model compiled each way in one process, called in turn for minutes, batch
# 64: 3.59 vs 3.57 ms per step (2 pairs with BLAS under 3.7 ms), 3.88 vs 3.78 (10 pairs, 3.7-4.2), 4.69 vs
# 4.11 (78 pairs over 4.2 ms); batch 128: 7.33 vs 7.05 (30 pairs); same codes. Above 128 it keeps BLAS.
DECOMPOSE_MM_MAX_ROWS = 128


def compile_config(device: torch.device) -> CompileConfig:
    """How `generate()` compiles the decoding forward. On CPU, inductor's C++ wrapper calls the
    kernels from C++ instead of a Python function (0.83 -> 0.72 ms per token at batch 1, one run),
    and small matrix products are inductor's own kernels (`DECOMPOSE_MM_MAX_ROWS`)."""
    if device.type == "cpu":
        rows = {"cpu_max_first_dimension_decomposition": DECOMPOSE_MM_MAX_ROWS}
        _set_decompose_mm_rows(DECOMPOSE_MM_MAX_ROWS)
        options = {"cpp_wrapper": True, "post_grad_fusion_options": {"decompose_mm_pass": rows}}
        config = CompileConfig(dynamic=False, mode=None, options=options)
    else:
        config = CompileConfig(dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers only auto-compiles on GPUs
    return config


def _set_decompose_mm_rows(rows: int):
    """Inductor reads the pass's CPU row limit from its options when the pass's module is first imported
    (once per process), so a module imported earlier (any earlier compile) is given it here too; the
    options still carry it, which keeps it in inductor's cache key."""
    from torch._inductor.fx_passes import decompose_mem_bound_mm

    if hasattr(decompose_mem_bound_mm, "cpu_max_first_dimension_decomposition"):
        decompose_mem_bound_mm.cpu_max_first_dimension_decomposition = rows


class GuardSkip:
    """Skips the compiled forward's guard checks from the second decoding step of one `generate()` call on.

    Before each call of a compiled function, dynamo checks every guard it recorded (shapes, dtypes,
    module attributes, ...) to pick the right graph: 0.05 ms of a 0.7 ms compiled batch-1 step. Within
    one call the decoding steps of a static cache all see the same shapes, so once the first decoding
    step has run with every check (compiling anew if this call's batch or length is new),
    `torch.compiler.set_stance(skip_guard_eval_unsafe=True)` runs only the guards that tell the cached
    graphs apart. Used as a context manager around the call, which restores the caller's stance, so the
    next call's first step checks everything again. `step` is called once per step, after the forward:
    call 1 follows the prefill (never compiled), call 2 the first compiled decoding step.

    Only under the default stance (a caller's `force_eager`, `fail_on_recompile` or forced backend is
    left alone). The stance is process-wide: while a compiled call runs, compiled code in other
    threads skips its checks too, so compiled sampling is not for several threads at once.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.calls = 0
        self._stance = None

    def step(self):
        self.calls += 1
        if self.enabled and self.calls == 2:
            caller = getattr(torch._dynamo.eval_frame, "_stance", None)  # no public getter
            if caller is not None and caller.stance == "default" and caller.backend is None:
                self._stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._stance is not None:
            self._stance.__exit__(None, None, None)  # back to the stance before this call
            self._stance = None


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for a decoder-only model: (B, L) ids and attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


@torch.no_grad()
def generate_ids(
    model,
    vocab,
    prompt_ids: list[list[int]],
    params: SamplingParams,
    max_new_tokens: int,
    grammar: SegmentGrammar,
    stop_at_eos: bool = True,
) -> torch.Tensor:
    """Left-padded prompts -> the new ids (B, max_new_tokens), <pad> after <eos>; CFG doubles the batch.
    `stop_at_eos=False` drops generate()'s end-of-sequence check, for callers whose grammar lets no row
    reach <eos> before the last of the `max_new_tokens` steps."""
    device = next(model.parameters()).device
    b = len(prompt_ids)
    guided = params.cfg_scale != 1.0
    rows = prompt_ids + [vocab.unconditional_prompt()] * b if guided else prompt_ids
    ids, mask = left_pad(rows, vocab.pad)
    guards = GuardSkip(params.compile and SKIP_GUARDS)
    processors = LogitsProcessorList([NextToken(grammar, params, guards.step)])  # generate() runs greedy
    cache = {}
    attention = model.config._attn_implementation
    if params.kv_cache == "static":
        cache["cache_implementation"] = "static"
        if params.compile:
            cache["compile_config"] = compile_config(device)
        if attention == "sdpa":  # attend over the filled part of the cache only
            if not params.compile:
                attention = LIVE_SDPA
            elif device.type == "cpu" and len(rows) >= COMPILED_LIVE_MIN_ROWS:  # measured on CPUs only
                attention = COMPILED_LIVE_SDPA
            else:
                attention = COMPILED_SDPA
    if not params.compile:
        cache["disable_compile"] = True
    with attention_implementation(model, attention), guards:
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            logits_processor=processors,
            pad_token_id=vocab.pad,
            bos_token_id=vocab.bos,
            eos_token_id=vocab.eos if stop_at_eos else None,
            use_cache=params.use_cache,
            do_sample=False,
            **cache,
        )
    new = out[:b, ids.shape[1] :].cpu()
    if new.shape[1] < max_new_tokens:  # every row stopped early: pad to a fixed width
        new = torch.cat([new, new.new_full((b, max_new_tokens - new.shape[1]), vocab.pad)], 1)
    return new


def generate_codes(model, vocab, prompt_ids: list[list[int]], params: SamplingParams) -> torch.Tensor:
    """Joint-id prompts (each `<bos> text <boi>`) -> code grids (B, h, w).

    After <boi> the grammar allows N codes and <eoi> before anything else, so no row can reach <eos>
    before the last of the N + 2 steps and generate() need not check each step for finished rows (its
    EOS criterion and the padding of finished rows: batch 1 0.451 -> 0.427 ms per compiled step, one
    process, same codes)."""
    after_boi = all(row and row[-1] == vocab.boi for row in prompt_ids)
    new = generate_ids(
        model, vocab, prompt_ids, params, vocab.image_tokens + 2, SegmentGrammar(vocab), stop_at_eos=not after_boi
    )
    return vocab.ids_to_codes(new[:, : vocab.image_tokens])  # (B, N) image ids -> (B, h, w)


@torch.no_grad()
def generate_images(model, vocab, text_tokenizer, image_tokenizer, prompts: list[str], params: SamplingParams):
    """Prompts -> images (P * images_per_prompt, 3, H, W) in [-1, 1], grouped by prompt.

    Seeded without touching the caller's RNG state (a training run's RNG stays exact).
    """
    if not prompts:
        raise ValueError("no prompts given")
    rows = [vocab.prompt(text_tokenizer.encode(p)) for p in prompts for _ in range(params.images_per_prompt)]
    was_training = model.training
    model.eval()
    images = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        for start in range(0, len(rows), params.batch_size):
            codes = generate_codes(model, vocab, rows[start : start + params.batch_size], params)
            images.append(image_tokenizer.decode(codes.to(next(image_tokenizer.parameters()).device)).cpu())
    model.train(was_training)
    return torch.cat(images)


def _wrap(text: str, width: int) -> list[str]:
    lines = [""]
    for word in text.split():
        if lines[-1] and len(lines[-1]) + 1 + len(word) > width:
            lines.append("")
        lines[-1] = f"{lines[-1]} {word}".strip()
    return lines


def make_grid(images: torch.Tensor, labels: list[str] | None = None, ncol: int = 8, cell: int = 128) -> Image.Image:
    """Images (B, 3, H, W) in [-1, 1] -> one PIL grid, each cell upscaled to `cell` px under its wrapped label."""
    n = images.shape[0]
    ncol = max(1, min(ncol, n))
    nrow = (n + ncol - 1) // ncol
    wrapped = [_wrap(label, cell // 6) for label in labels] if labels else []
    label_h = 11 * max((len(w) for w in wrapped), default=0) + (4 if labels else 0)
    grid = Image.new("RGB", (ncol * cell, nrow * (cell + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i in range(n):
        r, c = divmod(i, ncol)
        x, y = c * cell, r * (cell + label_h)
        grid.paste(tensor_to_image(images[i]).resize((cell, cell), Image.NEAREST), (x, y + label_h))
        if labels:
            draw.multiline_text((x + 2, y + 1), "\n".join(wrapped[i]), fill=(0, 0, 0), font=font, spacing=1)
    return grid
