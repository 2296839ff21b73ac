"""Shared fixtures: one tiny trained system (both stages through the real CLIs), built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_DATA = [
    "--data.source.shapes.train_size", "256", "--data.source.shapes.test_size", "64",
    "--data.source.shapes.heldout_size", "32",
]  # fmt: skip
EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments" / "shapes"


def fit_tokenizer(root: Path, cache: Path, steps: int = 30, name: str = "tok", extra=()) -> Path:
    from unimodal.training.fit import TokenizerCLI

    TokenizerCLI(args=[
        "fit", "--config", str(EXPERIMENTS / "tokenizer.yaml"), "--run.root", str(root), "--run.name", name,
        "--run.wandb", "disabled", "--data.source.cache_dir", str(cache), *TINY_DATA,
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps // 2),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--model.model.codebook_size", "64", *extra,
    ])  # fmt: skip
    return root / name / "export"


def fit_transformer(root: Path, cache: Path, tokenizer: Path, steps: int = 30, name: str = "lm", extra=()) -> Path:
    from unimodal.training.fit import TransformerCLI

    TransformerCLI(args=[
        "fit", "--config", str(EXPERIMENTS / "transformer.yaml"), "--run.root", str(root), "--run.name", name,
        "--run.wandb", "disabled", "--data.source.cache_dir", str(cache), *TINY_DATA,
        "--data.image_tokenizer", str(tokenizer), "--data.text_tokenizer", str(root / "text_tokenizer"),
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps // 2),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--model.model.n_layers", "2", "--model.model.d_model", "64", "--model.model.ffn_hidden", "128",
        "--samples.prompts", "[a red circle at the top left]", "--samples.images_per_prompt", "2",
        *extra,
    ])  # fmt: skip
    return root / name / "export"


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_cache")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, hf_cache) -> dict[str, Path]:
    """Tiny runs of both stages: {'root', 'tokenizer', 'bundle'}."""
    root = tmp_path_factory.mktemp("runs")
    tokenizer = fit_tokenizer(root, hf_cache, steps=40)
    bundle = fit_transformer(root, hf_cache, tokenizer, steps=40)
    return {"root": root, "tokenizer": tokenizer, "bundle": bundle}


@pytest.fixture(scope="session")
def bundle(trained):
    from unimodal.generation.bundle import Bundle

    return Bundle.load(trained["bundle"])
