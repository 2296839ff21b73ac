"""Shared benchmark helpers: the machine's measured matmul peak, timing, and table/JSON output."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from unimodal.timing import sync, time_it  # noqa: F401  (the benchmarks import them from here)

# Square matmul sides timed for the peak. A CPU's peak can need a large matmul to show (small ones
# leave the threads waiting on each other), a GPU's needs larger ones still to fill its SMs.
CPU_PEAK_SIZES = (1024, 2048, 3072)
GPU_PEAK_SIZES = (4096, 8192)
# A single-thread run only needs the smaller sides: one core is saturated well before 3072.
SINGLE_THREAD_MAX_SIZE = 2048
PROBE_SIZE = 256  # timed first: a rate to predict the larger matmuls' cost before starting them


@dataclass(frozen=True)
class PeakConfig:
    """The matmul that reached the peak: its side, dtype, torch thread count, and which round (1-based)."""

    size: int
    dtype: str
    threads: int
    repeat: int
    seconds: float

    def describe(self) -> str:
        threads = f"{self.threads} thread" + ("s" if self.threads != 1 else "")
        return f"{self.dtype} {self.size}^3 matmul, {threads}, round {self.repeat}"


class PeakFlops(float):
    """A measured peak in FLOP/s. A float, so callers divide by it directly; `config` names the matmul
    that reached it, `timed` how many matmuls were timed, `elapsed` the seconds the measurement took."""

    config: PeakConfig
    timed: int
    elapsed: float

    def __new__(cls, flops: float, config: PeakConfig, timed: int, elapsed: float):
        peak = super().__new__(cls, flops)
        peak.config, peak.timed, peak.elapsed = config, timed, elapsed
        return peak

    def describe(self) -> str:
        return f"best of {self.timed} timed: {self.config.describe()}; {self.elapsed:.1f} s"

    def as_dict(self) -> dict:
        return {"flops": float(self), **asdict(self.config), "timed": self.timed, "elapsed_s": self.elapsed}


def describe_peak(peak: float) -> str:
    """` (best of N timed: <matmul>)` for a measured peak, "" for a bare number (a fixed peak)."""
    return f" ({peak.describe()})" if isinstance(peak, PeakFlops) else ""


def peak_info(peak: float) -> dict | None:
    """The measured peak's matmul as a JSON-ready dict (None for a bare number)."""
    return peak.as_dict() if isinstance(peak, PeakFlops) else None


def _matmul_seconds(a: torch.Tensor, b: torch.Tensor, device: str) -> float:
    """Seconds of one `a @ b` (the one timer of the peak measurement)."""
    start = time.perf_counter()
    torch.matmul(a, b)
    sync(device)
    return time.perf_counter() - start


def measured_peak_flops(
    device: str = "cpu",
    dtype=None,
    sizes: tuple[int, ...] | None = None,
    threads: tuple[int, ...] | None = None,
    repeats: int = 4,
    budget_s: float = 4.0,
) -> PeakFlops:
    """The machine's matmul peak FLOP/s (by default fp32 on CPU, bf16 on GPU): the denominator of every MFU.

    The best rate over square matmuls of several `sizes`, at each of `threads` torch CPU thread counts
    (default: the current count, and 1 if different: with another process on one core, a single
    thread can beat all of them), over `repeats` rounds. The rounds go over every matmul in turn, so
    a burst of other work on the machine slows one round's matmuls rather than every repeat of one,
    and the best of them is the machine's. A matmul whose predicted time (from the rates seen so far)
    would overrun `budget_s` seconds is halved until it fits, else skipped (a CPU without bf16 units
    multiplies bf16 at a few GFLOP/s). The thread count is restored afterwards.
    """
    cuda = device.startswith("cuda")
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    sizes = tuple(sizes or (GPU_PEAK_SIZES if cuda else CPU_PEAK_SIZES))
    original = torch.get_num_threads()
    if threads is None:
        threads = (original,) if cuda or original == 1 else (original, 1)
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    matmuls = [(n, t) for t in threads for n in sizes if t == threads[0] or n <= SINGLE_THREAD_MAX_SIZE]
    matmuls = matmuls or [(n, t) for t in threads[:1] for n in sizes]
    tensors = {}
    best: tuple[float, PeakConfig] | None = None
    timed = 0
    rates: dict[int, float] = {}  # the best FLOP/s per thread count, to predict a matmul's seconds
    start = time.perf_counter()

    def timed_matmul(n: int, t: int, repeat: int) -> None:
        nonlocal best, timed
        if n not in tensors:
            tensors[n] = (torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))
        if torch.get_num_threads() != t:
            torch.set_num_threads(t)
        seconds = _matmul_seconds(*tensors[n], device)
        timed += 1
        flops = 2 * n**3 / seconds
        rates[t] = max(rates.get(t, 0.0), flops)
        if best is None or flops > best[0]:
            best = (flops, PeakConfig(n, dtype_name, t, repeat, seconds))

    try:
        timed_matmul(min(PROBE_SIZE, min(sizes)), threads[0], 1)  # also warms the thread pool and the kernels
        for repeat in range(1, repeats + 1):
            done = set()
            for n, t in matmuls:
                rate = rates.get(t) or max(rates.values())
                while n > PROBE_SIZE and time.perf_counter() - start + 2 * n**3 / rate > budget_s:
                    n //= 2  # too slow here (bf16 without bf16 units): a smaller side that fits
                if (n, t) not in done and time.perf_counter() - start + 2 * n**3 / rate <= budget_s:
                    done.add((n, t))
                    timed_matmul(n, t, repeat)
    finally:
        torch.set_num_threads(original)
    return PeakFlops(best[0], best[1], timed, time.perf_counter() - start)


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


PEAK_DISTURBED = "n/a (peak disturbed)"
PEAK_DISTURBED_MESSAGE = (
    "MFU above 1 refused: the peak measurement was disturbed (the machine was busier while it ran than "
    "while the rows ran); rerun on a quieter machine."
)


def is_peak_fraction(column: str) -> bool:
    """An MFU column (or an MFU ceiling, `... bound`): a fraction of the measured peak, at most 1."""
    return "mfu" in column.lower() or column.endswith(" bound")


def refuse_disturbed_mfu(rows: list[dict]) -> tuple[list[dict], set[tuple[int, str]]]:
    """The rows with every MFU above 1 set to None (a matmul peak cannot be beaten: such a value means
    the peak was measured while the machine was busier), and the (row index, column) cells refused."""
    refused = {(i, k) for i, row in enumerate(rows) for k, v in row.items()
               if is_peak_fraction(k) and isinstance(v, (int, float)) and v > 1}  # fmt: skip
    kept = [{k: None if (i, k) in refused else v for k, v in row.items()} for i, row in enumerate(rows)]
    return kept, refused


def print_table(title: str, rows: list[dict], json_path: str | None = None, extra: dict | None = None):
    """Print rows as a markdown table; optionally write {"title", "rows", **extra} as JSON.

    An MFU above 1 is never printed: its cell reads "n/a (peak disturbed)" (null in the JSON, with
    "peak_disturbed": true) and one line after the table says to rerun on a quieter machine."""
    if not rows:
        print(f"{title}: no rows")
        return
    rows, refused = refuse_disturbed_mfu(rows)
    keys = list(rows[0])
    print(f"\n## {title}\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for i, row in enumerate(rows):
        print("| " + " | ".join(PEAK_DISTURBED if (i, k) in refused else _fmt(row.get(k)) for k in keys) + " |")
    if refused:
        print(f"\n{PEAK_DISTURBED_MESSAGE}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        extra = {**(extra or {}), **({"peak_disturbed": True} if refused else {})}
        Path(json_path).write_text(json.dumps({"title": title, "rows": rows, **extra}, indent=2))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
