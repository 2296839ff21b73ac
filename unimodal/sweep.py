"""`unimodal sweep FAMILY_DIR`: run an experiment family - Lightning fit runs that each change one
factor against a baseline - then compare them.

A family is a folder with a `sweep.yaml`:

    stage1: [../shapes/tokenizer.yaml]                # stage-1 configs: one tokenizer shared by every run
    stage2: [../shapes/transformer.yaml, common.yaml]   # stage-2 configs every run starts from
    runs: [baseline, steps-x3, ...]                     # run names; each is <name>.yaml in the folder
    sort_by: eval/heldout/caption_fidelity              # the metric the comparison is ranked by
    descending: true

and one `<name>.yaml` per run: a stage-2 config diff whose first comment line says what it changes
and why. A run that changes the image tokenizer adds `<name>.stage1.yaml` (a stage-1 diff); it then
trains its own tokenizer. Paths in sweep.yaml are relative to the folder.

Everything lands in `{root}/{family}/`: the shared `tokenizer/`, the shared `text_tokenizer/` and
`judge/`, one folder per run (`csv/metrics.csv`, `wandb/`, `export/`, `eval_*.json`), and
`compare/` (`compare.md` + `curves.png`). All runs share the W&B group `{family}`. A finished run
(its `export/` exists) is skipped, so an interrupted sweep picks up where it stopped; `--force` reruns.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SWEEP_FILE = "sweep.yaml"


@dataclass
class Family:
    directory: Path
    stage1: list[Path]
    stage2: list[Path]
    runs: list[str]
    sort_by: str | None = None
    descending: bool = False
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.directory.name

    def run_config(self, run: str) -> Path:
        return self.directory / f"{run}.yaml"

    def tokenizer_diff(self, run: str) -> Path | None:
        path = self.directory / f"{run}.stage1.yaml"
        return path if path.is_file() else None


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.strip().startswith("#"):
            return line.strip().lstrip("#").strip()
    return ""


def load_family(directory: str | Path) -> Family:
    """Reads and checks `sweep.yaml`; every error names the file and what to fix."""
    directory = Path(directory)
    spec_file = directory / SWEEP_FILE
    if not spec_file.is_file():
        raise FileNotFoundError(
            f"{directory} is not an experiment family: it has no {SWEEP_FILE} (see `unimodal sweep --help`)"
        )
    spec = yaml.safe_load(spec_file.read_text()) or {}
    unknown = set(spec) - {"stage1", "stage2", "runs", "sort_by", "descending"}
    if unknown:
        raise ValueError(
            f"{spec_file}: unknown keys {sorted(unknown)}; allowed: stage1, stage2, runs, sort_by, descending"
        )

    def paths(key: str) -> list[Path]:
        value = spec.get(key) or []
        value = [value] if isinstance(value, str) else value
        found = [Path(os.path.normpath(directory / p)) for p in value]
        missing = [str(p) for p in found if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{spec_file}: {key} names missing config file(s): {', '.join(missing)}")
        return found

    stage1, stage2 = paths("stage1"), paths("stage2")
    if not stage2:
        raise ValueError(
            f"{spec_file}: `stage2` must list at least one stage-2 config (e.g. ../shapes/transformer.yaml)"
        )
    runs = spec.get("runs") or sorted(
        p.stem for p in directory.glob("*.yaml") if p.name != SWEEP_FILE and not p.name.endswith(".stage1.yaml")
        and Path(os.path.normpath(p)) not in stage2
    )  # fmt: skip
    family = Family(directory, stage1, stage2, list(runs), spec.get("sort_by"), bool(spec.get("descending", False)))
    if len(set(family.runs)) != len(family.runs):
        raise ValueError(f"{spec_file}: `runs` lists a name twice: {family.runs}")
    for run in family.runs:
        if not family.run_config(run).is_file():
            raise FileNotFoundError(f"{spec_file}: run {run!r} has no config {family.run_config(run)}")
        if family.tokenizer_diff(run) and not stage1:
            raise ValueError(f"{spec_file}: run {run!r} has a .stage1.yaml but the family has no `stage1` configs")
        family.notes[run] = _first_comment(family.run_config(run))
    return family


@dataclass
class PlannedFit:
    """One fit run of the sweep: which program, its arguments, and where its export lands."""

    stage: str  # "tokenizer" | "transformer"
    name: str
    args: list[str]
    export: Path

    def command(self) -> str:
        return shlex.join(["unimodal", self.stage, "fit", *self.args])


def plan(family: Family, root: str | Path, wandb: str = "auto", stage1_args=(), stage2_args=()) -> list[PlannedFit]:
    """The fit runs of a family, in order: shared tokenizer first, then per run (its own tokenizer if it
    has a stage-1 diff, then stage 2)."""
    base = Path(root) / family.name
    common = ["--run.root", str(base), "--run.group", family.name, "--run.wandb", wandb]

    def configs(files) -> list[str]:
        return [a for f in files for a in ("--config", str(f))]

    def tokenizer(name: str, extra: list[Path]) -> PlannedFit:
        args = [
            *configs([*family.stage1, *extra]),
            *common,
            "--run.name",
            name,
            "--run.tags",
            f"[{family.name}, stage1]",
        ]
        return PlannedFit("tokenizer", name, [*args, *stage1_args], base / name / "export")

    fits, shared = [], None
    for run in family.runs:
        diff = family.tokenizer_diff(run)
        if diff is not None:
            tok = tokenizer(f"{run}-tokenizer", [diff])
            fits.append(tok)
        elif family.stage1:
            if shared is None:
                shared = tokenizer("tokenizer", [])
                fits.append(shared)
            tok = shared
        else:
            tok = None
        args = [*configs([*family.stage2, family.run_config(run)]), *common, "--run.name", run, "--run.tags",
                f"[{family.name}, {run}]", "--data.text_tokenizer", str(base / "text_tokenizer")]  # fmt: skip
        if tok is not None:
            args += ["--data.image_tokenizer", str(tok.export)]
        fits.append(PlannedFit("transformer", run, [*args, *stage2_args], base / run / "export"))
    return fits


def run_sweep(
    directory: str | Path,
    root: str | Path = "runs",
    only: list[str] | None = None,
    force: bool = False,
    dry_run: bool = False,
    wandb: str = "auto",
    stage1_args: str = "",
    stage2_args: str = "",
    out: str | Path | None = None,
) -> Path | None:
    """Runs the family's fits that are not finished yet, then writes the comparison. Returns compare.md."""
    family = load_family(directory)
    if only:
        unknown = sorted(set(only) - set(family.runs))
        if unknown:
            raise ValueError(f"--only names unknown run(s) {unknown}; the family has {family.runs}")
        family.runs = [r for r in family.runs if r in only]
    fits = plan(family, root, wandb, shlex.split(stage1_args), shlex.split(stage2_args))
    if dry_run:
        for fit in fits:
            print(fit.command())
        return None

    from .demo import _finish_wandb
    from .fit import TokenizerCLI, TransformerCLI

    failed = []
    for i, fit in enumerate(fits, 1):
        if fit.export.exists() and not force:
            print(f"[sweep {family.name}] {i}/{len(fits)} {fit.stage} {fit.name}: done already ({fit.export})")
            continue
        print(f"[sweep {family.name}] {i}/{len(fits)} {fit.stage} {fit.name}\n  {fit.command()}", flush=True)
        start = time.perf_counter()
        try:
            (TokenizerCLI if fit.stage == "tokenizer" else TransformerCLI)(args=["fit", *fit.args])
        except Exception as err:  # one broken run does not stop the family; reported at the end
            failed.append(f"{fit.name}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}")
            print(f"[sweep {family.name}] {fit.name} FAILED: {failed[-1]}", flush=True)
        finally:
            _finish_wandb()
        print(f"[sweep {family.name}] {fit.name}: {(time.perf_counter() - start) / 60:.1f} min", flush=True)

    from .compare import compare

    base = Path(root) / family.name
    done = [r for r in family.runs if (base / r / "csv").is_dir()]
    table = None
    if done:
        table, plot = compare(
            [base / r for r in done], out or base / "compare", family.sort_by, family.descending,
            notes={r: family.notes[r] for r in done},
        )  # fmt: skip
        print(table.read_text())
        print(f"table -> {table}\nplot  -> {plot}")
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) of {family.name} failed: " + "; ".join(failed))
    return table
