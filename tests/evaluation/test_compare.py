"""`compare`: runs' CSV logs -> one table (sorted, best in bold, filtered, with notes) and a plot."""

import pytest
from PIL import Image

from unimodal.evaluation.compare import compare


def test_compare_sorts_highlights_and_filters(tmp_path):
    for name, fid in (("a", 0.5), ("b", 0.9), ("c", 0.7)):
        run = tmp_path / name / "csv"
        run.mkdir(parents=True)
        (run / "metrics.csv").write_text(
            f"epoch,step,val/loss,eval/test/caption_fidelity\n0,10,{1 - fid},\n0,20,{0.9 - fid},\n0,20,,{fid}\n"
        )
    table, plot = compare([tmp_path / n for n in "abc"], tmp_path / "cmp", "eval/test/caption_fidelity", True,
                          notes={"b": "the good one"}, metrics=["fidelity"])  # fmt: skip
    rows = [line for line in table.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["**b**", "c", "a"]
    assert "the good one" in rows[0] and "val/loss" not in table.read_text()
    assert plot.is_file()
    with pytest.raises(ValueError, match="no metric of the runs matches"):
        compare([tmp_path / "a"], tmp_path / "cmp2", metrics=["nothing"])


def test_compare_two_runs_writes_table_and_plot(trained, tmp_path):
    table, plot = compare([trained["root"] / "tok", trained["root"] / "lm"], tmp_path / "cmp", sort_by="val/loss")
    text = table.read_text()
    rows = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")}
    assert {"tok", "**lm**"} <= rows, rows  # lm is the only run with val/loss, so it is the best and bold
    assert "val/psnr" in text and "val/loss_image" in text
    # each run validated once: no metric has a curve, so the plot is the ranking metric's one panel
    assert 300 < Image.open(plot).size[0] < 600
