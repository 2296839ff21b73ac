"""`python -m unimodal.bench profile {train,sample}`: where the time of one step goes.

Runs a few training steps (the bare loop of `bench train`, same model and batches) or one batched
`generate_codes` call (the path `unimodal sample` takes; with `--compile` the fast path's
`generate_codes_fast`) under two profilers and prints two tables:
the aten operators by self CPU time (`torch.profiler`), and the Python functions by own time
(`cProfile`, which also sees the library's per-step Python work between operators). The first line
says how much of the wall time the operators account for: the rest is Python overhead.

    python -m unimodal.bench profile train                      # default model, batch 64
    python -m unimodal.bench profile sample --batch 64 --grid 16 --cache static
    python -m unimodal.bench profile sample --batch 1 --grid 16 --cache static --compile
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from .common import add_model_args, model_config, print_table


def _operator_rows(prof, top: int, wall_us: float) -> list[dict]:
    events = [e for e in prof.key_averages() if e.key.startswith("aten::") or e.key.startswith("mkl")]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {
            "operator": e.key,
            "calls": e.count,
            "self ms": e.self_cpu_time_total / 1e3,
            "% of wall": 100 * e.self_cpu_time_total / wall_us,
        }
        for e in events[:top]
    ]


def _python_rows(stats: pstats.Stats, top: int, wall_s: float) -> list[dict]:
    rows = []
    for (path, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        where = "/".join(path.split("/")[-2:]) if "/" in path else path
        rows.append({"function": f"{where}:{line} {name}", "calls": calls, "own ms": 1e3 * own,
                     "cumulative ms": 1e3 * cumulative, "% of wall (own)": 100 * own / wall_s})  # fmt: skip
    rows.sort(key=lambda r: r["own ms"], reverse=True)
    return rows[:top]


def profile_call(fn: Callable[[], object], label: str, top: int, json_path: str | None = None) -> dict:
    """Profile `fn()` once with each profiler (after one warm-up call) and print both tables."""
    fn()  # warm-up: first-call allocations and lazy initialisation stay out of the tables
    start = time.perf_counter()
    fn()
    plain = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    ops = _operator_rows(prof, top, wall * 1e6)
    aten_total = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::")) / 1e6
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(fn)
    wall_cprofile = time.perf_counter() - start
    python = _python_rows(pstats.Stats(profiler), top, wall_cprofile)
    summary = {
        "wall s (no profiler)": plain,
        "wall s (torch.profiler)": wall,
        "aten self s": aten_total,
        "aten share of wall": aten_total / wall,
    }
    print(f"{label}: " + ", ".join(f"{k} {v:.3g}" for k, v in summary.items()))
    print_table(f"aten operators by self CPU time ({label})", ops)
    print_table(f"Python functions by own time, cProfile ({label})", python, json_path,
                {"summary": summary, "operators": ops})  # fmt: skip
    return summary


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m unimodal.bench profile", description=__doc__.split("\n\n")[0])
    p.add_argument("target", choices=["train", "sample"], help="a training step or a sampling call")
    p.add_argument("--batch", type=int, default=64, help="batch size (sequences / images)")
    p.add_argument("--grid", type=int, default=8, help="image tokens = grid^2")
    add_model_args(p)
    p.add_argument("--steps", type=int, default=4, help="training steps per profiled call (train)")
    p.add_argument("--cache", default="dynamic", choices=["none", "dynamic", "static"], help="KV cache (sample)")
    p.add_argument("--compile", action="store_true", help="the fast path's compiled loop (sample, --cache static)")
    p.add_argument("--top", type=int, default=15, help="rows per table")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from unimodal.lm.vocab import JointVocab

    vocab = JointVocab(text_size=1024, image_size=512, image_grid=(args.grid, args.grid), max_text_tokens=32)
    if args.target == "train":
        from unimodal.training.modules import TransformerModule

        from .train import bare_loop, synthetic_batches

        module = TransformerModule(vocab=vocab, model=model_config(args, p))
        batches = synthetic_batches(vocab, args.batch, 16, args.steps)
        label = f"{args.steps} training steps, batch {args.batch}, seq {batches[0]['input_ids'].shape[1]}"
        profile_call(lambda: bare_loop(module, batches, warmup=0), label, args.top, args.json)
    else:
        from unimodal.generation.bundle import image_codes
        from unimodal.generation.sampling import SamplingParams
        from unimodal.lm.transformer import build_transformer

        model = build_transformer(model_config(args, p), vocab).eval()
        prompts = [vocab.prompt(list(range(3, 15)))] * args.batch
        mode = {"use_cache": False} if args.cache == "none" else {"cache": args.cache}
        try:
            params = SamplingParams(seed=0, batch_size=args.batch, compile=args.compile, **mode)
        except ValueError as e:
            p.error(str(e))
        name = "generate_codes_fast" if args.compile else "generate_codes"  # what image_codes calls
        label = f"{name}, batch {args.batch}, {vocab.image_tokens} codes, cache {args.cache}"
        profile_call(lambda: image_codes(model, vocab, prompts, params), label, args.top, args.json)
    return 0
