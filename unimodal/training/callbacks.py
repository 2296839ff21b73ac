"""The callbacks of the fit runs: export the trained artifact, draw a sample grid after each
validation, evaluate the trained system at the end of fit."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L

from unimodal.generation.sampling import SamplingParams
from unimodal.training.loggers import log_image
from unimodal.viz import make_grid


class Export(L.Callback):
    """Writes the trained artifact at the end of fit: the image tokenizer folder (stage 1) or the
    bundle (stage 2), into `dir` (default: `{run.root}/{run.name}/export`)."""

    def __init__(self, dir: str | None = None):
        self.dir = dir

    def on_fit_end(self, trainer, pl_module):
        if trainer.interrupted:
            return
        if _sharded(trainer) or trainer.is_global_zero:  # under FSDP every process helps gather the weights
            path = pl_module.export(Path(self.dir), trainer.datamodule)
            if trainer.is_global_zero:
                print(f"exported {type(pl_module).__name__.replace('Module', '').lower()} -> {path}")


def _sharded(trainer) -> bool:
    """Weights sharded across processes (FSDP): gathering them for sampling or export is collective."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


class SampleGrid(L.Callback):
    """After each validation, generates images for fixed prompts and logs the grid (W&B + PNG file).

    Args:
        prompts: captions to draw; the same ones every validation, so runs are comparable.
        images_per_prompt: samples per caption.
        temperature: sampling temperature.
        top_k: keep the k most likely ids (None = all allowed ids).
        cfg_scale: classifier-free guidance scale (1 = off; needs data.caption_dropout > 0).
        seed: sampling seed (the training RNG is not touched).
        out_dir: folder for `samples_step{N}.png` (default: the run folder).
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        images_per_prompt: int = 4,
        temperature: float = 1.0,
        top_k: int | None = None,
        cfg_scale: float = 1.0,
        seed: int = 0,
        out_dir: str | None = None,
    ):
        self.prompts = prompts or []
        self.params = SamplingParams(
            temperature=temperature, top_k=top_k, cfg_scale=cfg_scale, seed=seed, images_per_prompt=images_per_prompt
        )
        self.out_dir = out_dir

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not self.prompts or not (trainer.is_global_zero or _sharded(trainer)):
            return
        bundle = pl_module.bundle(trainer.datamodule)
        if bundle is None:  # FSDP: this process only helped gather the weights
            return
        images = bundle.generate(self.prompts, self.params)
        labels = [p for p in self.prompts for _ in range(self.params.images_per_prompt)]
        grid = make_grid(images, labels, ncol=self.params.images_per_prompt * 2)
        if self.out_dir:
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            grid.save(Path(self.out_dir) / f"samples_step{trainer.global_step}.png")
        log_image(trainer.loggers, "val/samples", grid, trainer.global_step)


_NOT_METRICS = ("num_captions", "rerank_candidates")  # evaluation settings, not results


class Evaluation(L.Callback):
    """At the end of fit, evaluates the trained system and logs `eval/{split}/...` to every logger: a row of
    metrics.csv, the W&B run summary (and, on shapes, a W&B table of prompts, generated images and the
    judge's reading). Also writes `eval_{split}.json` and `.png` into the run folder. Off while `splits`
    is empty. On the built-in shapes: `evaluate.py` (caption fidelity, judge accuracy on real images, the
    tokenizer's PSNR and fidelity ceiling). On any other data: `realdata.py` (Fréchet distance, KID,
    prompt agreement, attribute accuracy, tokenizer PSNR/SSIM/usage, each beside ceiling and floor).

    Args:
        splits: splits to evaluate, e.g. [test, heldout] on shapes, [test] on a folder (empty = off).
        num_captions: captions generated per split.
        temperature: sampling temperature.
        top_k: keep the k most likely allowed ids (None = all).
        cfg_scale: classifier-free guidance scale (1 = off; needs data.caption_dropout > 0).
        seed: sampling seed.
        rerank: candidates per caption; the contrastive scorer of `rerank.py` (trained on the train
            split, cached in `{run.root}/reranker`) keeps the best (1 = off). The first candidate's
            fidelity is logged too, as `eval/{split}/caption_fidelity_without_rerank`.
        judge_dir: judge cache (default: `{run.root}/judge`, shared by the runs of a family).
        judge_train_images: generated scenes the judge trains on (once per cache).
        reranker_train_pairs: training pairs the reranker trains on (once per cache).
        table_rows: rows per split in the W&B table.
        feature_dir: real data: cache of the evaluation features network (default: `{run.root}/eval_features`).
        feature_steps: real data: training steps of that network (once per cache).
    """

    def __init__(
        self,
        splits: list[str] | None = None,
        num_captions: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        cfg_scale: float = 1.0,
        seed: int = 0,
        rerank: int = 1,
        judge_dir: str | None = None,
        judge_train_images: int = 8000,
        reranker_train_pairs: int = 20000,
        table_rows: int = 32,
        feature_dir: str | None = None,
        feature_steps: int = 800,
    ):
        self.splits = list(splits or [])
        self.feature_dir, self.feature_steps = feature_dir, feature_steps
        self.num_captions, self.judge_dir, self.table_rows = num_captions, judge_dir, table_rows
        self.judge_train_images = judge_train_images
        if rerank < 1:
            raise ValueError(f"evaluation.rerank is the number of candidates per caption (>= 1), got {rerank}")
        self.rerank, self.reranker_train_pairs = rerank, reranker_train_pairs
        self.params = SamplingParams(temperature=temperature, top_k=top_k, cfg_scale=cfg_scale, seed=seed)
        self._start = None

    def on_fit_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        """After the last step, while the model is still on its device (Lightning moves it to CPU before
        `on_fit_end`). `eval/fit_minutes` is the wall time of this fit (after a resume: since the resume)."""
        if not self.splits or trainer.interrupted or not (trainer.is_global_zero or _sharded(trainer)):
            return
        from unimodal.evaluation.evaluate import SPLITS, evaluate_bundle, write_json
        from unimodal.evaluation.judge import JudgeConfig

        dm = trainer.datamodule
        minutes = (time.perf_counter() - self._start) / 60 if self._start else float("nan")
        run_dir = Path(trainer.default_root_dir)
        if dm.source.name != "shapes":
            return self._evaluate_real(trainer, pl_module, run_dir, minutes)
        unknown = [s for s in self.splits if s not in SPLITS]
        if unknown:
            raise ValueError(f"evaluation.splits on the built-in shapes takes {list(SPLITS)}, got {unknown}")
        shapes = dm.source.shapes
        judge = JudgeConfig(shapes.resolution, shapes.background, train_images=self.judge_train_images)
        bundle = pl_module.bundle(dm)
        if bundle is None:  # FSDP: this process only helped gather the weights
            return
        was_training = bundle.transformer.training
        bundle.transformer.eval()
        metrics, tables = {"eval/fit_minutes": minutes}, {}
        try:
            for split in self.splits:
                details = {}
                result = evaluate_bundle(
                    bundle, split, self.judge_dir or run_dir.parent / "judge", self.num_captions, self.params,
                    shapes=shapes, grid_path=run_dir / f"eval_{split}.png", details=details, judge_config=judge,
                    rerank=self.rerank, reranker_train_pairs=self.reranker_train_pairs,
                )  # fmt: skip
                write_json(result, run_dir / f"eval_{split}.json")
                for key, value in result.items():
                    if isinstance(value, int | float) and not isinstance(value, bool) and key not in _NOT_METRICS:
                        metrics[f"eval/{split}/{key}"] = float(value)
                for key, value in result["fidelity_by_attribute"].items():
                    metrics[f"eval/{split}/fidelity_{key}"] = value
                tables[split] = details
        finally:
            bundle.transformer.train(was_training)
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)
            lg.save()
        _log_eval_tables(trainer.loggers, tables, metrics, self.table_rows)
        print("evaluation: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith("fidelity")))

    def _evaluate_real(self, trainer, pl_module, run_dir: Path, minutes: float):
        from unimodal.evaluation.evaluate import write_json
        from unimodal.evaluation.realdata import evaluate_real

        dm = trainer.datamodule
        bundle = pl_module.bundle(dm)
        if bundle is None:
            return
        was_training = bundle.transformer.training
        bundle.transformer.eval()
        metrics = {"eval/fit_minutes": minutes}
        try:
            for split in self.splits:
                result = evaluate_real(
                    bundle, dm.source, split, self.feature_dir or run_dir.parent / "eval_features",
                    self.num_captions, self.params, grid_path=run_dir / f"eval_{split}.png",
                    features={"steps": self.feature_steps},
                )  # fmt: skip
                write_json(result, run_dir / f"eval_{split}.json")
                metrics.update(_flat_metrics(result, f"eval/{split}"))
        finally:
            bundle.transformer.train(was_training)
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)
            lg.save()
            if hasattr(lg, "experiment") and hasattr(lg.experiment, "summary"):
                lg.experiment.summary.update(metrics)
        shown = [k for k in metrics if k.endswith(("frechet_distance/generated", "r@5", "/generated"))]
        print("evaluation: " + ", ".join(f"{k} {metrics[k]:.3f}" for k in shown))


def _flat_metrics(result: dict, prefix: str) -> dict[str, float]:
    """Nested numeric results -> {'prefix/a/b': value}; settings and names are left out."""
    out = {}
    for key, value in result.items():
        if key in _NOT_METRICS or key == "sampling":
            continue
        if isinstance(value, dict):
            out.update(_flat_metrics(value, f"{prefix}/{key}"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = float(value)
    return out


def _log_eval_tables(loggers, tables: dict, metrics: dict, rows: int):
    """W&B only: the final metrics into the run summary and one table of generated samples."""
    from lightning.pytorch.loggers import WandbLogger
    from PIL import Image

    from unimodal.data.images import tensor_to_image
    from unimodal.evaluation.judge import describe

    for lg in loggers:
        if not isinstance(lg, WandbLogger):
            continue
        import wandb

        table = wandb.Table(columns=["split", "prompt", "image", "judged", "match"])
        for split, d in tables.items():
            for i in range(min(rows, len(d["captions"]))):
                image = wandb.Image(tensor_to_image(d["images"][i]).resize((128, 128), Image.Resampling.NEAREST))
                table.add_data(split, d["captions"][i], image, describe(d["judged"], i), bool(d["match"][i]))
        lg.experiment.log({"eval/samples": table})
        lg.experiment.summary.update(metrics)
