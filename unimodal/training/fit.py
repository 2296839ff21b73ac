"""The two fit runs as LightningCLI programs (`fit`, `validate`, `--config`, `--print_config`, `--ckpt_path`).

    unimodal tokenizer fit --config experiments/shapes/tokenizer.yaml
    unimodal transformer fit --config experiments/shapes/transformer.yaml
    unimodal decoder fit --config experiments/decoder/shapes.yaml   (optional: a diffusion decoder after stage 1)

Beyond the usual `trainer`/`model`/`data` sections, each run has `run` (name, output folder, W&B
project/group), `export` (where the trained artifact goes), and stage 2 has `samples` (the prompts
drawn after every validation) and `evaluation` (at the end of fit: caption fidelity on shapes splits,
the real-data metrics on any other data; logged as `eval/...`). The joint vocabulary is linked from
the data module into the model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from unimodal.training.callbacks import Evaluation, Export, SampleGrid
from unimodal.training.datamodules import ImageDataModule, SequenceDataModule
from unimodal.training.loggers import RunConfig, build_loggers
from unimodal.training.modules import TokenizerModule, TransformerModule, ignore_library_deprecations
from unimodal.training.strategies import register_strategies

register_strategies()  # `--trainer.strategy fsdp_decoder`


def _primitive(value):
    """The parsed config as JSON-friendly primitives for W&B's run config."""
    if isinstance(value, dict):
        return {k: _primitive(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_primitive(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; raised before backward, so no bad update or checkpoint is written."""


class FiniteLossGuard(L.Callback):
    """Stops a run at the first non-finite loss, before it can touch the weights or the checkpoints."""

    def on_before_backward(self, trainer, pl_module, loss):
        if not bool(torch.isfinite(loss)):
            last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
            kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"loss became {float(loss)} at step {trainer.global_step}; {kept}. Lower model.lr, set "
                "trainer.gradient_clip_val, or use trainer.precision 32-true, then resume with --ckpt_path."
            )


class _FitCLI(LightningCLI):
    def __init__(self, model_class, datamodule_class, args=None, run=True):
        # The `unimodal` console script hands its own arguments over as `args`; LightningCLI's warning about
        # seeing them in sys.argv too is meant for developers. (sys.argv itself must stay: DDP relaunches it.)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            ignore_library_deprecations()
            self._build(model_class, datamodule_class, args, run)

    def _build(self, model_class, datamodule_class, args, run):
        super().__init__(
            model_class,
            datamodule_class,
            args=args,
            run=run,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            # our EpochSampler shards global batches itself (exact resume, DDP == 1 process)
            trainer_defaults={"log_every_n_steps": 10, "num_sanity_val_steps": 0, "use_distributed_sampler": False},
            parser_kwargs={"parser_mode": "yaml"},
            auto_configure_optimizers=False,
        )

    def add_arguments_to_parser(self, parser):
        parser.add_class_arguments(RunConfig, "run")
        parser.add_lightning_class_args(Export, "export")
        if "weights_only" in {a.dest for a in parser._actions}:
            parser.set_defaults(weights_only=True)  # resuming never unpickles arbitrary objects

    def _parse_ckpt_path(self) -> None:
        """On resume LightningCLI re-applies the checkpoint's model hyperparameters to the config. The stage-2
        `vocab` among them is a record of the vocabulary linked from the data module (with derived fields such
        as `size`), not a model argument: it is left out so that it cannot fail to parse, and the data module
        links the vocabulary as in the first run. `compile` is how the run executes, not what it trains: the
        command line decides it on resume."""
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return
        ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        self._resume_step = ckpt.get("global_step")
        hparams = ckpt.get("hyper_parameters") or {}
        hparams.pop("_instantiator", None)
        hparams.pop("vocab", None)
        hparams.pop("compile", None)
        if hparams:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

    def _run_config(self) -> RunConfig:
        return self._get(self.config_init, "run")

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        run = self._run_config()
        export = self._get(self.config_init, "export")
        export.dir = export.dir or str(run.dir / "export")
        config = self.config if self.subcommand is None else self.config[self.subcommand]
        config = _primitive(config.as_dict())
        kwargs.setdefault("logger", build_loggers(run, config, getattr(self, "_resume_step", None)))
        kwargs.setdefault("default_root_dir", str(run.dir))
        callbacks = list(self._get(self.config_init, "trainer.callbacks") or [])
        if not any(isinstance(c, ModelCheckpoint) for c in callbacks):  # unless the config brings its own
            every = run.checkpoint_every_n_steps
            callbacks.append(
                ModelCheckpoint(dirpath=run.dir / "checkpoints", save_last=True, every_n_train_steps=every)
            )
        callbacks.append(FiniteLossGuard())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


class TokenizerCLI(_FitCLI):
    """Stage 1: train the image tokenizer."""

    def __init__(self, args=None, run=True):
        super().__init__(TokenizerModule, ImageDataModule, args=args, run=run)

    def add_arguments_to_parser(self, parser):
        super().add_arguments_to_parser(parser)
        parser.link_arguments("model.model.resolution", "data.resolution")


class TransformerCLI(_FitCLI):
    """Stage 2: train the transformer on joint sequences."""

    def __init__(self, args=None, run=True):
        super().__init__(TransformerModule, SequenceDataModule, args=args, run=run)

    def add_arguments_to_parser(self, parser):
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(SampleGrid, "samples")
        parser.add_lightning_class_args(Evaluation, "evaluation")
        parser.link_arguments("data.vocab", "model.vocab", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        samples = self._get(self.config_init, "samples")
        samples.out_dir = samples.out_dir or str(self._run_config().dir / "samples")
        return super().instantiate_trainer(**kwargs)


class DecoderCLI(_FitCLI):
    """After stage 1: train a diffusion decoder from the frozen tokenizer's codes to pixels."""

    def __init__(self, args=None, run=True):
        from unimodal.training.decoder import DecoderModule

        super().__init__(DecoderModule, ImageDataModule, args=args, run=run)

    def before_instantiate_classes(self):
        """The images are the tokenizer's size: data.resolution follows model.tokenizer."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        config.data.resolution = _tokenizer_resolution(config.model.tokenizer)


def _tokenizer_resolution(path: str) -> int:
    from unimodal.tokenizers.image import load_config
    from unimodal.training.decoder import tokenizer_folder

    folder = tokenizer_folder(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"model.tokenizer {path} is not an image tokenizer folder (no config.json); "
                         "give the export of `unimodal tokenizer fit` or a bundle")  # fmt: skip
    return load_config(folder).resolution


class ContinuousCLI(TransformerCLI):
    """Stage 2 over continuous image tokens (a `quantizer: kl` tokenizer): latents in, a diffusion head out."""

    def __init__(self, args=None, run=True):
        from unimodal.training.continuous import ContinuousTransformerModule, LatentSequenceDataModule

        _FitCLI.__init__(self, ContinuousTransformerModule, LatentSequenceDataModule, args=args, run=run)

    def add_arguments_to_parser(self, parser):
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.latent_dim", "model.image_tokenizer_dim", apply_on="instantiate")
