"""`unimodal sweep FAMILY_DIR`: run an experiment family - Lightning fit runs that each change one
factor against a baseline - then compare them.

A family is a folder with a `sweep.yaml`:

    stage1: [../shapes/tokenizer.yaml]                # stage-1 configs: one tokenizer shared by every run
    stage2: [../shapes/transformer.yaml, common.yaml]   # stage-2 configs every run starts from
    runs: [baseline, steps-x3, ...]                     # run names; each is <name>.yaml in the folder
    sort_by: eval/heldout/caption_fidelity              # the metric the comparison is ranked by
    descending: true
    metrics: [caption_fidelity, loss_image]             # optional: the table's columns (substrings)

and one `<name>.yaml` per run: a stage-2 config diff whose first comment line says what it changes
and why. A run that changes the image tokenizer adds `<name>.stage1.yaml` (a stage-1 diff); it then
trains its own tokenizer. Paths in sweep.yaml are relative to the folder. The stage-2 program follows
the run's image tokenizer: a continuous one (`quantizer: kl`) is trained by `unimodal continuous fit`
(so its diff may set `model.head`), any other by `unimodal transformer fit`.

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
RESERVED = ("tokenizer", "text_tokenizer", "judge", "compare")  # folders the family itself keeps in its root


@dataclass
class Family:
    directory: Path
    stage1: list[Path]
    stage2: list[Path]
    runs: list[str]
    sort_by: str | None = None
    descending: bool = False
    metrics: list[str] | None = None
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
    allowed = ("stage1", "stage2", "runs", "sort_by", "descending", "metrics")
    unknown = set(spec) - set(allowed)
    if unknown:
        raise ValueError(f"{spec_file}: unknown keys {sorted(unknown)}; allowed: {', '.join(allowed)}")

    def strings(key: str) -> list[str]:
        value = spec.get(key) or []
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{spec_file}: `{key}` must be a list of strings, got {value!r}")
        return value

    def paths(key: str) -> list[Path]:
        found = [Path(os.path.normpath(directory / p)) for p in strings(key)]
        missing = [str(p) for p in found if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{spec_file}: {key} names missing config file(s): {', '.join(missing)}")
        return found

    stage1, stage2 = paths("stage1"), paths("stage2")
    if not stage2:
        raise ValueError(
            f"{spec_file}: `stage2` must list at least one stage-2 config (e.g. ../shapes/transformer.yaml)"
        )
    if not isinstance(spec.get("descending", False), bool):
        raise ValueError(f"{spec_file}: `descending` must be true or false, got {spec['descending']!r}")
    runs = strings("runs") or sorted(
        p.stem for p in directory.glob("*.yaml") if p.name != SWEEP_FILE and not p.name.endswith(".stage1.yaml")
        and Path(os.path.normpath(p)) not in stage1 + stage2
    )  # fmt: skip
    family = Family(
        directory, stage1, stage2, runs, spec.get("sort_by"), spec.get("descending", False), strings("metrics") or None
    )  # fmt: skip
    if len(set(family.runs)) != len(family.runs):
        raise ValueError(f"{spec_file}: `runs` lists a name twice: {family.runs}")
    reserved = set(RESERVED) | {f"{r}-tokenizer" for r in family.runs if family.tokenizer_diff(r)}
    clash = sorted(reserved & set(family.runs))
    if clash:
        raise ValueError(f"{spec_file}: run name(s) {clash} would share a folder with the family's own; rename them")
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

    stage: str  # "tokenizer" | "transformer" | "continuous": the `unimodal` command that fits it
    name: str
    args: list[str]
    export: Path

    def command(self) -> str:
        return shlex.join(["unimodal", self.stage, "fit", *self.args])


QUANTIZER_FLAG = "--model.model.quantizer"


def stage2_program(stage1_configs: list[Path], stage1_args=()) -> str:
    """`continuous` when the stage-1 configs and then the stage-1 arguments (later ones win) set a
    continuous quantizer, else `transformer`."""
    from unimodal.tokenizers.latent import CONTINUOUS

    quantizer = None
    for path in stage1_configs:
        config = yaml.safe_load(Path(path).read_text()) or {}
        quantizer = ((config.get("model") or {}).get("model") or {}).get("quantizer", quantizer)
    args = list(stage1_args)
    for i, arg in enumerate(args):
        if arg == QUANTIZER_FLAG and i + 1 < len(args):
            quantizer = args[i + 1]
        elif arg.startswith(QUANTIZER_FLAG + "="):
            quantizer = arg.split("=", 1)[1]
    return "continuous" if quantizer in CONTINUOUS else "transformer"


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
        program = stage2_program([*family.stage1, *([diff] if diff is not None else [])], stage1_args)
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
        fits.append(PlannedFit(program, run, [*args, *stage2_args], base / run / "export"))
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
    """Runs the family's fits that are not finished yet, then compares every finished run of the family
    (not only those of `--only`). Returns compare.md. Fits run one after another in this process; for
    multi-GPU runs, launch the `--dry-run` commands instead (Lightning's DDP launcher re-runs the command)."""
    family = load_family(directory)
    selected = family.runs
    if only:
        unknown = sorted(set(only) - set(family.runs))
        if unknown:
            raise ValueError(f"--only names unknown run(s) {unknown}; the family has {family.runs}")
        selected = [r for r in family.runs if r in only]
    everything = plan(family, root, wandb, shlex.split(stage1_args), shlex.split(stage2_args))
    own = set(selected) | {f"{r}-tokenizer" for r in selected}
    if any(family.tokenizer_diff(r) is None for r in selected):
        own.add("tokenizer")  # the shared tokenizer, when a selected run trains on it
    fits = [f for f in everything if f.name in own]
    if dry_run:
        for fit in fits:
            print(fit.command())
        return None

    from unimodal.training.fit import ContinuousCLI, TokenizerCLI, TransformerCLI
    from unimodal.training.loggers import finish_wandb

    programs = {"tokenizer": TokenizerCLI, "transformer": TransformerCLI, "continuous": ContinuousCLI}

    base = Path(root) / family.name
    failed = []
    for i, fit in enumerate(fits, 1):
        # --force retrains the selected runs; the shared tokenizer only when missing (other runs use it)
        forced = force and fit.name != "tokenizer"
        if not forced and _finished(fit, base, family.sort_by):
            print(f"[sweep {family.name}] {i}/{len(fits)} {fit.stage} {fit.name}: done already ({fit.export})")
            continue
        print(f"[sweep {family.name}] {i}/{len(fits)} {fit.stage} {fit.name}\n  {fit.command()}", flush=True)
        start = time.perf_counter()
        try:
            programs[fit.stage](args=["fit", *fit.args])
        except (Exception, SystemExit) as err:  # one broken run (or config) does not stop the family
            if isinstance(err, SystemExit) and err.code in (0, None):
                continue
            failed.append(f"{fit.name}: {type(err).__name__}: {first_line(err)}")
            print(f"[sweep {family.name}] {fit.name} FAILED: {failed[-1]}", flush=True)
        finally:
            finish_wandb()
        print(f"[sweep {family.name}] {fit.name}: {(time.perf_counter() - start) / 60:.1f} min", flush=True)

    from unimodal.evaluation.compare import compare

    done, missing = [], []
    for r in family.runs:
        (done if (base / r / "csv" / "metrics.csv").is_file() else missing).append(r)
    if missing:
        print(f"[sweep {family.name}] not compared (no metrics yet): {', '.join(missing)}")
    table = None
    if done:
        try:
            table, plot = compare(
                [base / r for r in done], out or base / "compare", family.sort_by, family.descending,
                notes={r: family.notes[r] for r in done}, metrics=family.metrics,
            )  # fmt: skip
            print(table.read_text())
            print(f"table -> {table}\nplot  -> {plot}")
        except (ValueError, FileNotFoundError) as err:
            failed.append(f"comparison: {first_line(err)}")
    if failed:
        raise RuntimeError(f"{len(failed)} problem(s) in family {family.name}: " + "; ".join(failed))
    return table


def _finished(fit: PlannedFit, base: Path, sort_by: str | None) -> bool:
    """A tokenizer fit is finished once exported; a transformer fit once exported *and* evaluated (its
    metrics.csv has the family's ranking metric), so a run killed during evaluation is rerun."""
    if not fit.export.exists():
        return False
    if fit.stage == "tokenizer" or not sort_by:
        return True
    metrics = base / fit.name / "csv" / "metrics.csv"
    return metrics.is_file() and sort_by in metrics.read_text().splitlines()[0].split(",")


def first_line(err: BaseException) -> str:
    """An exception's message reduced to its first non-empty line (user errors are one line)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
