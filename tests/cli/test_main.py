"""The user-facing commands: sample, compare, errors as one clear line."""

import subprocess
import sys

from PIL import Image

from unimodal.cli.main import main
from unimodal.evaluation.compare import compare


def test_sample_writes_grid_and_individual_images(trained, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main([
        "sample", "--bundle", str(trained["bundle"]), "--prompt", "a red circle at the top left",
        "--prompt", "a blue square at the bottom right", "--num-images", "3", "--seed", "1",
        "--temperature", "0.9", "--top-k", "20", "--out", str(out), "--out-dir", str(tmp_path / "each"),
    ])  # fmt: skip
    assert code == 0
    grid = Image.open(out)
    assert grid.size[0] >= 3 * 128
    assert len(list((tmp_path / "each").glob("*.png"))) == 6


def test_bad_input_gives_one_line_errors(trained, tmp_path, capsys):
    cases = [
        (["sample", "--bundle", str(tmp_path / "nope"), "--prompt", "x"], "not a unimodal bundle"),
        (["sample", "--bundle", str(trained["bundle"]), "--prompt", "x", "--temperature", "0"], "temperature"),
        (["sample", "--bundle", str(trained["bundle"]), "--prompt", "x", "--top-k", "-1"], "top_k"),
        (["sample", "--bundle", str(trained["bundle"]), "--prompt", "x", "--top-p", "1.5"], "top_p"),
        (["sample", "--bundle", str(trained["bundle"]), "--prompt", "  "], "empty --prompt"),
        (["compare", str(tmp_path), "--out", str(tmp_path / "c")], "no metrics.csv"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_compare_two_runs_writes_table_and_plot(trained, tmp_path):
    table, plot = compare([trained["root"] / "tok", trained["root"] / "lm"], tmp_path / "cmp", sort_by="val/loss")
    text = table.read_text()
    rows = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")}
    assert {"tok", "**lm**"} <= rows, rows  # lm is the only run with val/loss, so it is the best and bold
    assert "val/psnr" in text and "val/loss_image" in text
    assert Image.open(plot).size[0] > 300


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "unimodal", "--help"], capture_output=True, text=True, check=True)
    for command in ("tokenizer", "transformer", "sample", "evaluate", "compare", "demo"):
        assert command in out.stdout


def test_evaluate_reports_fidelity_judge_and_tokenizer(bundle, tmp_path):
    from unimodal.evaluation.evaluate import evaluate_bundle
    from unimodal.evaluation.judge import JudgeConfig

    result = evaluate_bundle(
        bundle, "heldout", tmp_path / "judge", num_captions=16, judge_config=JudgeConfig(train_images=512, epochs=2)
    )
    for key in ("caption_fidelity", "judge_accuracy_real", "tokenizer_psnr", "tokenizer_codebook_usage"):
        assert key in result
    assert 0 <= result["caption_fidelity"] <= 1 and 0 < result["tokenizer_codebook_usage"] <= 1
    assert result["num_captions"] == 16 and (tmp_path / "judge" / "model.safetensors").is_file()


def test_quick_demo_runs_every_step_with_offline_wandb(tmp_path, monkeypatch):
    from unimodal.cli.demo import run_demo

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    summary = run_demo(tmp_path / "demo", wandb="offline", quick=True)
    out = tmp_path / "demo"
    assert Image.open(out / "samples.png").size[0] > 0
    assert (out / "eval_test.json").is_file() and (out / "compare" / "compare.md").is_file()
    assert list((out / "runs" / "shapes-transformer" / "wandb").glob("offline-run-*"))
    assert set(summary["caption_fidelity"]) == {"test", "heldout"}
