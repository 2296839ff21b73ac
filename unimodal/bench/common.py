"""Shared benchmark helpers: the machine's measured matmul peak, timing, and table/JSON output."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch


def measured_peak_flops(device: str = "cpu", size: int = 2048, repeats: int = 10, dtype=None) -> float:
    """FLOP/s of large square matmuls (by default fp32 on CPU, bf16 on GPU): the denominator of every MFU."""
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = time_it(lambda: a @ b, repeats=repeats, warmup=2, device=device)
    return 2 * size**3 / seconds


def time_it(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device: str = "cpu") -> float:
    """Median seconds per call of `fn`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def sync(device: str | torch.device):
    """Wait for queued GPU work, so wall-clock timers measure it (a no-op on CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_args(parser, n_layers: int = 4, d_model: int = 192, n_heads: int = 4, ffn_hidden: int = 512):
    """The transformer-size flags shared by `bench train` and `bench sample` (defaults: the demo model)."""
    parser.add_argument("--n-layers", type=int, default=n_layers)
    parser.add_argument("--d-model", type=int, default=d_model)
    parser.add_argument("--n-heads", type=int, default=n_heads)
    parser.add_argument("--ffn-hidden", type=int, default=ffn_hidden)
    parser.add_argument("--n-kv-heads", type=int, default=1, help="key/value heads (default: 1, the default model's)")


def model_config(args, parser):
    """The TransformerConfig the size flags ask for; a size it refuses ends the run with its one-line reason."""
    from unimodal.lm.transformer import TransformerConfig

    try:
        return TransformerConfig(args.n_layers, args.d_model, args.n_heads, args.ffn_hidden, n_kv_heads=args.n_kv_heads)
    except ValueError as err:
        parser.error(str(err))


def print_table(title: str, rows: list[dict], json_path: str | None = None, extra: dict | None = None):
    """Print rows as a markdown table; optionally write {"title", "rows", **extra} as JSON."""
    if not rows:
        print(f"{title}: no rows")
        return
    keys = list(rows[0])
    print(f"\n## {title}\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"title": title, "rows": rows, **(extra or {})}, indent=2))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
