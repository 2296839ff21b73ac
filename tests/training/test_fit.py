"""Tiny fit runs of both stages through the real LightningCLI programs."""

import csv

import pytest

from unimodal.evaluation.compare import read_curves
from unimodal.training.fit import TransformerCLI

from .conftest import EXPERIMENTS


def _first_last(run_dir, key):
    curve = read_curves(run_dir / "csv" / "metrics.csv")[key]
    return curve[0][1], curve[-1][1]


def test_tokenizer_fit_lowers_its_loss_and_logs_metrics(trained):
    run = trained["root"] / "tok"
    first, last = _first_last(run, "train/loss")
    assert last < first * 0.7
    curves = read_curves(run / "csv" / "metrics.csv")
    for key in ("val/psnr", "val/codebook_usage", "val/perplexity"):
        assert key in curves
    assert 0 < curves["val/codebook_usage"][-1][1] <= 1
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in trained["tokenizer"].iterdir()) == ["config.json", "model.safetensors"]


def test_transformer_fit_lowers_its_loss_and_logs_segments(trained):
    run = trained["root"] / "lm"
    first, last = _first_last(run, "train/loss")
    assert last < first * 0.8
    curves = read_curves(run / "csv" / "metrics.csv")
    for key in ("val/loss", "val/loss_text", "val/loss_image", "val/loss_image_unigram"):
        assert key in curves, key
    assert list((run / "samples").glob("samples_step*.png")), "no sample grid written at validation"
    assert (trained["bundle"] / "bundle.json").is_file()


def test_print_config_parses_the_experiment(capsys):
    with pytest.raises(SystemExit) as exit_:
        TransformerCLI(args=["fit", "--config", str(EXPERIMENTS / "transformer.yaml"), "--print_config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "grammar_loss_mask: true" in out and "d_model: 192" in out


def test_unknown_config_key_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  model:\n    n_layerz: 3\n")
    with pytest.raises(SystemExit) as exit_:
        TransformerCLI(args=["fit", "--config", str(EXPERIMENTS / "transformer.yaml"), "--config", str(bad)])
    assert exit_.value.code != 0
    assert "n_layerz" in capsys.readouterr().err


def test_metrics_csv_has_a_header_with_val_keys(trained):
    with open(trained["root"] / "lm" / "csv" / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert "train/loss" in header and "val/loss_image" in header


def test_resume_from_last_checkpoint_continues_the_step_count(trained, hf_cache):
    """`--ckpt_path` restores the run: a resumed fit picks up at the checkpoint's step."""
    import torch

    from .conftest import fit_tokenizer

    root = trained["root"]
    fit_tokenizer(root, hf_cache, steps=10, name="resume")
    last = root / "resume" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 10
    fit_tokenizer(root, hf_cache, steps=20, name="resume", extra=["--ckpt_path", str(last)])
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 20


def test_a_resumed_optimizer_takes_this_runs_fused_setting_not_the_checkpoints():
    """torch restores each optimizer group's settings from the checkpoint; a GPU run's `fused=True`
    resumed on a CPU (or under fp16, where clipping refuses fused) must be turned back off."""
    import lightning as L

    from unimodal.training.modules import TokenizerModule

    module = TokenizerModule()
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    checkpoint = {"optimizer_states": [{"state": {}, "param_groups": [{"params": [0], "fused": True}]}]}
    module.on_load_checkpoint(checkpoint)
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["fused"] is None
    TokenizerModule().on_load_checkpoint(checkpoint)  # no trainer (load_from_checkpoint): nothing to do
