"""Compare fit runs offline from their CSV logs: a markdown table of final metrics and a PNG of
validation curves. The same runs share a W&B project/group, so the UI shows the same comparison.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def find_metrics(run_dir: str | Path) -> Path:
    """The newest metrics.csv under a run folder (Lightning's CSVLogger writes it)."""
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.name == "metrics.csv":
        return run_dir
    found = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no metrics.csv under {run_dir}: is it a fit run folder (runs/<name>)?")
    return found[-1]


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv -> {metric: [(step, value), ...]} with empty cells skipped."""
    curves: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                v = float(value)
                if math.isfinite(v):
                    curves.setdefault(key, []).append((step, v))
    return curves


def run_name(run_dir: str | Path) -> str:
    p = Path(run_dir)
    return p.parent.parent.name if p.name == "metrics.csv" else p.name


MAX_POINT_PANELS = 6  # panels drawn when no metric has a curve and no ranking metric is given


def _is_compared(metric: str) -> bool:
    """Validation curves (`val/`, `val_{split}/`) and end-of-fit evaluation (`eval/`)."""
    return metric.startswith(("val/", "val_", "eval/"))


def compare(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    sort_by: str | None = None,
    descending: bool = False,
    notes: dict[str, str] | None = None,
    metrics: list[str] | None = None,
) -> tuple[Path, Path]:
    """Writes `compare.md` (final value of every val/ and eval/ metric per run, sorted by `sort_by`, the
    best run in bold, with each run's note) and `curves.png` (metrics logged more than once, best run
    drawn thick; where none is, the ranking metric's points, or the first six metrics without one).
    `metrics` keeps only metrics containing one of the given substrings."""
    if not run_dirs:
        raise ValueError("give at least one run folder")
    names = [run_name(d) for d in run_dirs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"several runs are named {twice}; compare runs of one family, or give them distinct names")
    runs = {name: read_curves(find_metrics(d)) for name, d in zip(names, run_dirs)}
    found = sorted({k for c in runs.values() for k in c if _is_compared(k)})
    if metrics:  # the ranking metric always stays in the table
        found = [m for m in found if m == sort_by or any(pattern in m for pattern in metrics)]
    if not found:
        raise ValueError("the runs have no val/ or eval/ metrics yet (did validation run?)" if not metrics else
                         f"no metric of the runs matches {metrics}")  # fmt: skip
    finals = {name: {m: c[m][-1][1] for m in found if m in c} for name, c in runs.items()}
    order, best = list(finals), None
    if sort_by:
        if sort_by not in found:
            raise ValueError(f"unknown metric {sort_by!r}; the runs have {found}")
        missing = -math.inf if descending else math.inf
        order.sort(key=lambda n: finals[n].get(sort_by, missing), reverse=descending)
        best = order[0] if sort_by in finals[order[0]] else None
    notes = notes or {}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    note_col = any(notes.get(n) for n in order)
    header = ["run", *found] + (["what it changes"] if note_col else [])
    lines = []
    if sort_by:
        lines.append(f"Sorted by `{sort_by}` ({'higher' if descending else 'lower'} is better); best run in bold.\n")
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name in order:
        cells = [f"{finals[name][m]:.4g}" if m in finals[name] else "–" for m in found]
        label = f"**{name}**" if name == best else name
        note = notes.get(name, "").replace("|", "\\|")  # a note must not split the markdown row
        lines.append(f"| {label} | " + " | ".join(cells) + (f" | {note}" if note_col else "") + " |")
    table = out_dir / "compare.md"
    table.write_text("\n".join(lines) + "\n")

    curves = [m for m in found if any(len(c.get(m, [])) > 1 for c in runs.values())]
    if not curves:  # every metric is one point per run (a run validated once): no curve to draw but the ranking
        curves = [sort_by] if sort_by else found[:MAX_POINT_PANELS]
    ncol = min(3, len(curves))
    nrow = (len(curves) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.5 * ncol, 3.2 * nrow), squeeze=False)
    for ax, m in zip(axes.flat, curves):
        for name in order:
            if m in runs[name]:
                steps, values = zip(*runs[name][m])
                ax.plot(steps, values, marker="o", markersize=3, label=name + (" (best)" if name == best else ""),
                        linewidth=3 if name == best else 1.2)  # fmt: skip
        ax.set_title(m)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    plot = out_dir / "curves.png"
    fig.savefig(plot, dpi=100)
    plt.close(fig)
    return table, plot
