"""Fit runs of both stages through the real LightningCLI programs: losses fall, metrics and exports are
written, configs are checked, a non-finite loss stops the run with one line."""

import csv

import pytest
import torch
import yaml

from unimodal.cli.main import main
from unimodal.evaluation.compare import read_curves
from unimodal.training.fit import FiniteLossGuard, NonFiniteLossError, TransformerCLI

from ..conftest import TRANSFORMER_CONFIG, fit_tokenizer, fit_transformer, tokenizer_args


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


def test_print_config_parses_the_shipped_recipe(capsys):
    with pytest.raises(SystemExit) as exit_:
        TransformerCLI(args=["fit", "--config", str(TRANSFORMER_CONFIG), "--print_config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    shipped = yaml.safe_load(TRANSFORMER_CONFIG.read_text())["model"]
    printed = yaml.safe_load(out)["model"]
    assert printed["grammar_loss_mask"] is True
    assert {k: printed["model"][k] for k in shipped["model"]} == shipped["model"]  # the recipe's sizes, not defaults


def test_unknown_config_key_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  model:\n    n_layerz: 3\n")
    with pytest.raises(SystemExit) as exit_:
        TransformerCLI(args=["fit", "--config", str(TRANSFORMER_CONFIG), "--config", str(bad)])
    assert exit_.value.code != 0
    assert "n_layerz" in capsys.readouterr().err


def test_metrics_csv_has_a_header_with_val_keys(trained):
    with open(trained["root"] / "lm" / "csv" / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert "train/loss" in header and "val/loss_image" in header


def test_nonfinite_loss_stops_before_backward(tmp_path):
    class Trainer:
        default_root_dir = str(tmp_path)
        global_step = 41

    with pytest.raises(NonFiniteLossError, match="loss became nan at step 41; no checkpoint was written yet"):
        FiniteLossGuard().on_before_backward(Trainer(), None, torch.tensor(float("nan")))
    FiniteLossGuard().on_before_backward(Trainer(), None, torch.tensor(1.0))  # finite: no error


def test_diverging_run_fails_with_one_line_and_exports_nothing(tmp_path, hf_cache, capsys):
    args = tokenizer_args(tmp_path, hf_cache, "diverge", "--model.lr", "1e30", "--model.warmup_steps", "0",
                          "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0")  # fmt: skip
    assert main(["tokenizer", *args]) == 1
    err = capsys.readouterr().err
    assert "unimodal tokenizer: error: loss became" in err and "Traceback" not in err
    assert not (tmp_path / "diverge" / "export").exists()


@pytest.mark.slow
def test_streaming_fit_runs_both_stages(tmp_path, hf_cache):
    tok = fit_tokenizer(tmp_path, hf_cache, steps=6, name="stream-tok", extra=["--data.streaming", "true"])
    assert (tok / "model.safetensors").is_file()
    bundle = fit_transformer(tmp_path, hf_cache, tok, steps=6, name="stream-lm",
                             extra=["--data.streaming", "true"])  # fmt: skip
    assert (bundle / "bundle.json").is_file()


def test_fit_on_a_folder_of_txt_captions_records_it_and_evaluates_it(trained, tmp_path, hf_cache):
    """Stage 2 on RGBA pictures with .txt captions: the bundle records the folder, and the end-of-fit
    evaluation scores that folder with the real-data metrics (not the shapes judge)."""
    import json

    from PIL import Image

    folder = tmp_path / "pics"
    for split, n in (("train", 24), ("test", 4)):
        (folder / split).mkdir(parents=True)
        for i in range(n):
            colour = ("red", "blue")[i % 2]
            Image.new("RGBA", (32, 32), (255, 0, 0, 255) if colour == "red" else (0, 0, 255, 128)).save(
                folder / split / f"{i}.png"
            )
            (folder / split / f"{i}.txt").write_text(f"a {colour} square")
    extra = ["--data.source.name", str(folder), "--data.val_split", "test", "--data.batch_size", "8",
             "--evaluation.splits", "[test]", "--evaluation.num_captions", "4",
             "--evaluation.feature_steps", "5"]  # fmt: skip
    bundle = fit_transformer(tmp_path / "runs", hf_cache, trained["tokenizer"], steps=4, name="folder", extra=extra)
    assert json.loads((bundle / "data.json").read_text())["name"] == str(folder.resolve())
    result = json.loads((tmp_path / "runs" / "folder" / "eval_test.json").read_text())
    assert result["data"] == str(folder.resolve()) and result["num_captions"] == 4
    assert {"frechet_distance", "kid", "prompt_agreement", "tokenizer"} <= set(result)
    curves = read_curves(tmp_path / "runs" / "folder" / "csv" / "metrics.csv")
    assert "eval/test/frechet_distance/generated" in curves
