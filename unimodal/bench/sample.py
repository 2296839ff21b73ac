"""`python -m unimodal.bench sample`: text-to-image sampling speed, one run, one model.

For each mode - (a) `none`: full recomputation every step, (b) `dynamic`: the library's growing
KV cache, (c) `static`: the library's preallocated cache, all three through `generate()`
(`sampling.generate_codes`, the path `unimodal sample` takes, grammar processor included), and
(d) `fast` (alias `static+compile`): the fast path, an own decoding loop on the static cache whose
step is compiled once per batch size (`generation.fast.decode.generate_codes_fast`, what
`unimodal sample --compile` takes) - and each batch size, it times whole calls and reports images/s,
new tokens/s, and MFU against this machine's matmul peak measured in the same run.

MFU counts useful FLOPs only: per generated token 2 * (non-embedding params + lm-head params)
plus the attention term 4 * layers * d_model * context; full recomputation does far more work
than that, which is exactly what its low MFU shows. The `linear-layers bound` column is the
fraction of peak the model's own linear layers reach by themselves at that batch (one decoding
step's products, timed without anything else): the ceiling of a cached decoding step's MFU, up to
the attention term it leaves out (small here: 4 * layers * d_model * context against 2 * params).
`linear+attention bound` adds the time of SDPA alone over the mean context (one query row per image
against its cached keys and values, every layer): attention does few FLOPs but reads the whole
cache each step, so at batch 64 it is what the bound is made of. Neither applies to `none` rows,
whose every step multiplies the whole prefix, not one row per image.

    python -m unimodal.bench sample                       # fresh default-size model, 8x8 codes
    python -m unimodal.bench sample --grid 16             # 256-token images
    python -m unimodal.bench sample --bundle runs/x/export
    python -m unimodal.bench sample --scales 1 2 4 8 --modes dynamic   # next-scale (VAR): one forward per scale
    python -m unimodal.bench sample --grid 16 --scales 1 2 3 4 6 8 10 13 16 --modes dynamic --beside-raster \
        --raster-modes static fast              # both orders, one run, same model size (256-token images)
    python -m unimodal.bench sample --device cuda --grid 16 --codebook 1024 --n-layers 12 --d-model 768 \
        --n-heads 12 --ffn-hidden 2048               # GPU-sized
"""

from __future__ import annotations

import argparse
import time

import torch

from unimodal.generation.bundle import image_codes
from unimodal.generation.fast.host import keep_freed_memory
from unimodal.generation.sampling import SamplingParams
from unimodal.lm.transformer import build_transformer
from unimodal.lm.vocab import JointVocab

from .common import add_model_args, default_device, measured_peak_flops, model_config, print_table, time_it

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = {
    "none": {"use_cache": False},
    "dynamic": {"cache": "dynamic"},
    "static": {"cache": "static"},
    "fast": {"cache": "static", "compile": True},
}
ALIASES = {"static+compile": "fast"}


def mean_context(vocab: JointVocab, prompt_len: int) -> float:
    """Mean attended length (prompt + cached image codes) while drawing one image."""
    return prompt_len + vocab.image_tokens / 2


def flops_per_token(model, vocab: JointVocab, prompt_len: int) -> float:
    """Useful inference FLOPs per generated token (forward only), averaged over the image."""
    cfg = model.config
    embed = model.get_input_embeddings().weight.numel()
    dense = sum(p.numel() for p in model.parameters()) - embed  # tied head: the table is counted once
    head = cfg.vocab_size * cfg.hidden_size
    context = mean_context(vocab, prompt_len)
    return 2 * (dense + head) + 4 * cfg.num_hidden_layers * cfg.hidden_size * context


def linear_seconds(model, batch: int, device: str) -> tuple[float, float]:
    """(seconds, FLOPs) of the model's linear layers alone at this batch: every nn.Linear, lm head
    included, one (batch, in) x (in, out) product each, nothing else. Small batches make skinny matmuls."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(batch, m.in_features, device=device, dtype=m.weight.dtype) for m in linears]
    flops = sum(2 * batch * m.in_features * m.out_features for m in linears)

    @torch.no_grad()
    def step():
        for m, x in zip(linears, inputs):
            m(x)

    return time_it(step, repeats=20, warmup=3, device=device), flops


def attention_seconds(model, batch: int, context: int, device: str) -> float:
    """Seconds of SDPA alone for one decoding step: every layer's one query row per image and head
    against `context` cached keys and values (reading the cache is what bounds it). With fewer
    key/value heads, each one's query heads form its rows, as the library's decoding path packs them."""
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = next(model.parameters()).dtype
    q = torch.randn(batch, kv_heads, heads // kv_heads, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, context, head_dim, device=device, dtype=dtype) for _ in range(2))

    @torch.no_grad()
    def step():
        for _ in range(cfg.num_hidden_layers):
            torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return time_it(step, repeats=20, warmup=3, device=device)


def step_bounds(model, batch: int, context: int, fpt: float, device: str, peak: float) -> dict[str, float]:
    """The MFU a cached decoding step could show if nothing but its linear layers ran (`linear-layers
    bound`), and if nothing but its linear layers and its attention over the mean context ran
    (`linear+attention bound`): the ceiling the library's cache and SDPA kernel leave."""
    linear_s, linear_flops = linear_seconds(model, batch, device)
    attention_s = attention_seconds(model, batch, context, device)
    return {
        "linear-layers bound": linear_flops / linear_s / peak,
        "linear+attention bound": batch * fpt / (linear_s + attention_s) / peak,
    }


def _model(args, config):
    if args.bundle:
        from unimodal.generation.bundle import Bundle

        bundle = Bundle.load(args.bundle, device=args.device)
        prompt = bundle.vocab.prompt(bundle.text_tokenizer.encode("a large red circle at the top left"))
        return bundle.transformer, bundle.vocab, prompt, f"bundle {args.bundle}"
    vocab = JointVocab(text_size=1024, image_size=args.codebook, image_grid=(args.grid, args.grid),
                       image_scales=args.scales)  # fmt: skip
    torch.manual_seed(0)
    model = build_transformer(config, vocab).to(args.device, DTYPES[args.dtype]).eval()
    prompt = vocab.prompt(list(range(3, 3 + 12)))  # a 12-token caption
    size = f"{args.n_layers} layers, d={args.d_model}, {args.dtype}"
    codes = f"scales {args.scales}" if args.scales else f"{args.grid}x{args.grid} codes"
    return model, vocab, prompt, f"fresh model ({size}), {codes}, K={args.codebook}"


def _time_model(model, vocab, prompt, modes, args, peak: float, fpt: float, label: str | None) -> list[dict]:
    """One row per (batch, mode): whole sampling calls timed, with ratios against this model's own rows."""
    next_scale = vocab.image_scales is not None
    new_tokens = vocab.image_tokens + (0 if next_scale else 2)  # next-scale draws no <eoi> <eos>
    steps = len(vocab.image_scales) if next_scale else new_tokens  # forwards per image
    rows = []
    for batch in args.batches:
        for mode in modes:
            if f"{mode}@{batch}" in args.skip:
                continue
            params = SamplingParams(seed=0, batch_size=batch, **MODES[mode])
            prompts = [prompt] * batch

            def run(params=params, prompts=prompts):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    return image_codes(model, vocab, prompts, params)

            start = time.perf_counter()
            run()  # warm-up (and compilation)
            first = time.perf_counter() - start
            # a slow row (full recomputation at large batch) is timed by its first call alone
            slow = first > args.slow_seconds and mode != "fast"
            seconds = first if slow else time_it(run, repeats=args.repeats, warmup=0, device=args.device)
            images_s = batch / seconds
            rows.append({
                **({"model": label} if label else {}),
                "cache": mode, "batch": batch, "images/s": images_s, "tokens/s": images_s * new_tokens,
                "MFU": images_s * new_tokens * fpt / peak, "ms/decoding step": 1000 * seconds / steps,
                "s/call": seconds, "first call s": first,
            })  # fmt: skip
    context = round(mean_context(vocab, len(prompt)))
    bounds = {b: step_bounds(model, b, context, fpt, args.device, peak) for b in args.batches}
    for r in rows:
        r.update(bounds[r["batch"]])
    by = {(r["cache"], r["batch"]): r["images/s"] for r in rows}
    for r in rows:
        r["x vs none@same batch"] = r["images/s"] / by[("none", r["batch"])] if ("none", r["batch"]) in by else None
        base = by.get((r["cache"], min(args.batches)))
        r["x vs batch " + str(min(args.batches))] = r["images/s"] / base if base else None
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unimodal.bench sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=None, help="a trained bundle (default: a freshly initialised model)")
    p.add_argument("--grid", type=int, default=8, help="code grid side for the fresh model (16 = 256-token images)")
    p.add_argument("--codebook", type=int, default=512, help="codebook size K for the fresh model")
    p.add_argument("--scales", type=int, nargs="+", default=None,
                   help="next-scale images for the fresh model (VAR): ascending from 1 to --grid; drawn one "
                        "forward per scale on the dynamic cache (mode dynamic only)")  # fmt: skip
    add_model_args(p)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights of the fresh model")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="batch sizes (default 1 64)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=[*MODES, *ALIASES],
                   help="modes (default: all four; fast's first call per batch size compiles its step, "
                        "tens of seconds for the default model on a 2-core CPU)")  # fmt: skip
    p.add_argument("--beside-raster", action="store_true",
                   help="with --scales: also time the raster model of the same size and grid in this run, and "
                        "report each row's images/s against the raster rows of the same batch")  # fmt: skip
    p.add_argument("--raster-modes", nargs="+", default=["static"], choices=list(MODES),
                   help="the raster model's modes under --beside-raster (default: static, the plain path)")  # fmt: skip
    p.add_argument("--skip", nargs="*", default=[], help="rows to leave out, as MODE@BATCH (e.g. none@64)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row after a warm-up call (median)")
    p.add_argument(
        "--slow-seconds",
        type=float,
        default=20.0,
        help="a row whose first call takes longer is timed by that call alone (not compiled rows)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="glibc malloc keeps freed memory for reuse, as `unimodal sample --compile` does on CPU "
        "(generation.fast.host.keep_freed_memory; process-wide, so every mode of the run)",
    )
    p.add_argument("--device", default=default_device())
    p.add_argument("--json", default=None, help="also write the table here")
    args = p.parse_args(argv)
    args.modes = [ALIASES.get(mode, mode) for mode in args.modes]
    args.skip = [ALIASES.get(mode, mode) + at + batch for mode, at, batch in (row.partition("@") for row in args.skip)]
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.keep_freed_memory and args.device == "cpu" else False

    config = None if args.bundle else model_config(args, p)
    try:
        models = [_model(args, config)]
    except ValueError as err:  # scales the vocabulary refuses
        p.error(str(err))
    if models[0][1].image_scales is not None and args.modes != ["dynamic"]:
        p.error("next-scale images have one sampling path: pass --modes dynamic")
    if args.beside_raster:
        if args.bundle or not args.scales:
            p.error("--beside-raster times a fresh next-scale model (--scales) beside the raster model of its size")
        models.insert(0, _model(argparse.Namespace(**{**vars(args), "scales": None}), config))
    peak = measured_peak_flops(args.device)
    rows, extra = [], {"peak_flops": peak, "keep_freed_memory": kept}
    for model, vocab, prompt, what in models:
        next_scale = vocab.image_scales is not None
        modes = args.modes if next_scale or not args.beside_raster else args.raster_modes
        fpt = flops_per_token(model, vocab, len(prompt))
        print(f"model: {what}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; "
              f"{vocab.image_tokens} codes per image; measured peak {peak / 1e9:.1f} GFLOP/s; "
              f"{fpt / 1e6:.2f} MFLOP per generated token; torch threads {torch.get_num_threads()}; "
              f"malloc keeps freed memory: {kept}")  # fmt: skip
        label = ("next-scale" if next_scale else "raster") if args.beside_raster else None
        rows += _time_model(model, vocab, prompt, modes, args, peak, fpt, label)
        if label:
            extra.setdefault("flops_per_token", {})[label] = fpt
            extra.setdefault("image_tokens", {})[label] = vocab.image_tokens
        else:
            extra.update({"flops_per_token": fpt, "image_tokens": vocab.image_tokens})
    if args.beside_raster:
        raster = {(r["cache"], r["batch"]): r["images/s"] for r in rows if r["model"] == "raster"}
        for r in rows:
            for mode in args.raster_modes:
                base = raster.get((mode, r["batch"]))
                r[f"x vs raster {mode}"] = r["images/s"] / base if base else None
        extra["models"] = [what for *_, what in models]
    title = " beside ".join(what for *_, what in models)
    print_table(f"sampling speed ({title}, {args.device})", rows, args.json, extra)
    return 0
