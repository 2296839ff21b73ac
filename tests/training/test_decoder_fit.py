"""The diffusion decoder's fit run through the real CLI: trained after stage 1 with the tokenizer frozen,
exported as the tokenizer folder with the decoder inside, attached to a trained bundle, sampled from
with either decoder."""

import csv
import shutil

import pytest

from unimodal.cli.main import main
from unimodal.tokenizers.image import WEIGHTS_FILE, ImageTokenizer
from unimodal.tokenizers.pixel_diffusion import FOLDER

from ..conftest import QUIET, TINY_DATA


@pytest.mark.slow
def test_decoder_fit_then_attach_and_sample(trained, hf_cache, tmp_path, capsys):
    from unimodal.training.fit import DecoderCLI

    tokenizer = trained["tokenizer"]
    before = (tokenizer / WEIGHTS_FILE).read_bytes()
    DecoderCLI(args=[
        "fit", "--model.tokenizer", str(tokenizer), "--run.root", str(tmp_path), "--run.name", "dec", *QUIET,
        "--data.source.cache_dir", str(hf_cache), *TINY_DATA, "--data.batch_size", "16",
        "--model.model.channels", "16", "--model.model.channel_mult", "[1, 2]", "--model.model.sampling_steps", "4",
        "--model.val_images", "8", "--trainer.max_steps", "20", "--trainer.val_check_interval", "10",
        "--trainer.check_val_every_n_epoch", "null",
        "--data.max_val_images", "32",
    ])  # fmt: skip
    export = tmp_path / "dec" / "export"
    assert (export / FOLDER / WEIGHTS_FILE).is_file()
    assert (export / WEIGHTS_FILE).read_bytes() == before  # the tokenizer stayed frozen
    assert (tokenizer / WEIGHTS_FILE).read_bytes() == before
    loaded = ImageTokenizer.from_pretrained(export)
    assert float(loaded.pixel_decoder.residual_scale) > 0
    rows = list(csv.DictReader(open(tmp_path / "dec" / "csv" / "metrics.csv")))
    val = [r for r in rows if r.get("val/loss")]
    assert len(val) == 2 and float(val[1]["val/loss"]) < float(val[0]["val/loss"])
    assert all(r.get("val/psnr") and r.get("val/psnr_vq") for r in val)

    bundle = tmp_path / "bundle"
    shutil.copytree(trained["bundle"], bundle)
    assert main(["decoder", "attach", "--bundle", str(bundle), "--tokenizer", str(export)]) == 0
    grids = {}
    for decoder in ("auto", "vq"):
        out = tmp_path / f"{decoder}.png"
        assert main(["sample", "--bundle", str(bundle), "--prompt", "a red circle at the top left",
                     "--num-images", "2", "--decoder", decoder, "--out", str(out)]) == 0  # fmt: skip
        grids[decoder] = out.read_bytes()
    assert grids["auto"] != grids["vq"]
    capsys.readouterr()
    assert main(["decoder", "attach", "--bundle", str(bundle), "--tokenizer", str(tokenizer)]) == 2
    assert "pixel_decoder" in capsys.readouterr().err


def test_decoder_fit_refuses_a_folder_that_is_no_tokenizer(tmp_path, capsys):
    code = main(["decoder", "fit", "--model.tokenizer", str(tmp_path / "nothing"), "--run.root", str(tmp_path)])
    assert code != 0
    err = capsys.readouterr().err
    assert "not an image tokenizer folder" in err and "Traceback" not in err
