"""The `unimodal` command: sampling to a grid and to files, user errors as one clear line, --help."""

import subprocess
import sys

from PIL import Image

from unimodal.cli.main import main


def test_sample_writes_grid_and_individual_images(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main([
        "sample", "--bundle", str(tiny_bundle), "--prompt", "a red circle at the top left",
        "--prompt", "a blue square at the bottom right", "--num-images", "3", "--seed", "1",
        "--temperature", "0.9", "--top-k", "20", "--out", str(out), "--out-dir", str(tmp_path / "each"),
    ])  # fmt: skip
    assert code == 0
    grid = Image.open(out)
    assert grid.size[0] >= 3 * 128
    assert len(list((tmp_path / "each").glob("*.png"))) == 6


def test_bad_input_gives_one_line_errors(tiny_bundle, tmp_path, capsys):
    cases = [
        (["sample", "--bundle", str(tmp_path / "nope"), "--prompt", "x"], "not a unimodal bundle"),
        (["sample", "--bundle", str(tiny_bundle), "--prompt", "x", "--temperature", "0"], "temperature"),
        (["sample", "--bundle", str(tiny_bundle), "--prompt", "x", "--top-k", "-1"], "top_k"),
        (["sample", "--bundle", str(tiny_bundle), "--prompt", "x", "--top-p", "1.5"], "top_p"),
        (["sample", "--bundle", str(tiny_bundle), "--prompt", "  "], "empty --prompt"),
        (["sample", "--bundle", str(tiny_bundle), "--prompt", "x", "--cfg-scale", "-2"], "cfg_scale must be"),
        (["compare", str(tmp_path), "--out", str(tmp_path / "c")], "no metrics.csv"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err  # progress bars of weight loading may come before it
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith(f"unimodal {argv[0]}: error: ") and message in errors[0], err
        assert "Traceback" not in err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "unimodal", "--help"], capture_output=True, text=True, check=True)
    for command in ("tokenizer", "transformer", "sample", "evaluate", "compare", "demo"):
        assert command in out.stdout
