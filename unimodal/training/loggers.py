"""The one helper that builds a run's loggers: W&B (offline unless logged in) and CSV, always."""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


@dataclass
class RunConfig:
    """Where a fit run writes and how it shows up in W&B.

    Everything lands in `{root}/{name}/`: `csv/` (metrics.csv), `wandb/`, `checkpoints/`, the exported
    artifact and sample grids. Runs of one family share `project` and `group`, so they line up in the
    W&B UI as they do in `unimodal compare`.
    """

    name: str = "run"
    root: str = "runs"
    project: str = "unimodal"
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    wandb: str = "auto"  # auto (online if logged in, else offline) | online | offline | disabled
    checkpoint_every_n_steps: int | None = None  # also checkpoint (last.ckpt) every N optimizer steps

    def __post_init__(self):
        if self.wandb not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"run.wandb must be auto, online, offline or disabled; got {self.wandb!r}")
        if self.checkpoint_every_n_steps is not None and self.checkpoint_every_n_steps <= 0:
            raise ValueError(
                f"run.checkpoint_every_n_steps must be a positive integer or null, got {self.checkpoint_every_n_steps}"
            )

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a run resumed at step N keeps the rows it logged before N
    (Lightning's writer deletes an existing metrics.csv when it opens the folder); rows from N on are
    dropped, since the resumed run logs those steps again."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None or self.resume_step is None:
            return super().experiment
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        header, rows = [], []
        if path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                rows = [r for r in reader if int(float(r.get("step") or 0)) < self.resume_step]
        writer = super().experiment  # removes metrics.csv
        if rows:
            with open(path, "w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=header)
                out.writeheader()
                out.writerows(rows)
            writer.metrics_keys = header
        return writer


def build_loggers(run: RunConfig, config: dict | None = None, resume_step: int | None = None) -> list[Logger]:
    """CSVLogger always (offline comparison); WandbLogger unless disabled, logging `config` as run config.
    `resume_step`: the run resumes from a checkpoint at that step, so the CSV rows before it are kept."""
    run.dir.mkdir(parents=True, exist_ok=True)
    loggers: list[Logger] = [ResumableCSVLogger(save_dir=str(run.dir), name="csv", version="", resume_step=resume_step)]
    if run.wandb != "disabled":
        offline = run.wandb == "offline" or (run.wandb == "auto" and not wandb_logged_in())
        wandb_logger = WandbLogger(
            name=run.name,
            project=run.project,
            group=run.group,
            tags=run.tags or None,
            save_dir=str(run.dir),
            offline=offline,
            config=config,
        )
        loggers.append(wandb_logger)
    return loggers


def finish_wandb():
    """Close the active W&B run, if any: the next fit run in this process starts its own. A process that
    never imported wandb (every run had `run.wandb disabled`) has no run to close and needs no wandb."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def log_image(loggers: list[Logger], key: str, image, step: int, caption: str | None = None):
    """A PIL image to every logger that takes images (W&B); CSV keeps numbers only."""
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            extra = {"caption": [caption]} if caption else {}
            lg.log_image(key=key, images=[image], step=step, **extra)
