"""`unimodal reconstruct`: image files of any mode and size through a tokenizer, as one grid."""

from PIL import Image

from unimodal.cli.main import main as cli_main
from unimodal.tokenizers.image import ImageTokenizer, ImageTokenizerConfig

SMALL_FSQ = ImageTokenizerConfig(resolution=16, channels=8, channel_mult=[2, 4], code_dim=16, codebook_size=1024,
                                 quantizer="fsq")  # fmt: skip


def test_reconstruct_command_writes_a_grid(tmp_path, capsys):
    tok_dir = ImageTokenizer(SMALL_FSQ).save_pretrained(tmp_path / "tok")
    paths = []
    for i, (mode, size) in enumerate([("RGB", (40, 30)), ("L", (16, 16)), ("RGBA", (64, 80))]):
        path = tmp_path / f"im{i}.png"
        Image.new(mode, size, 120).save(path)
        paths.append(str(path))
    out = tmp_path / "grid.png"
    assert cli_main(["reconstruct", "--tokenizer", str(tok_dir), "--images", *paths, "--out", str(out)]) == 0
    assert Image.open(out).size == (3 * 128, 2 * 128)  # originals above, reconstructions below
    assert "PSNR" in capsys.readouterr().out
    assert cli_main(["reconstruct", "--tokenizer", str(tok_dir), "--images", str(tmp_path / "missing.png")]) == 2
    assert "error: no image file" in capsys.readouterr().err
