"""`bench sample`: images/s per cache and batch, with ratios against its own rows and roofline bounds."""

import json

import pytest

from unimodal.bench import sample as bench_sample

from .conftest import TINY


def test_sample_bench_reports_ratios_against_its_own_rows(tmp_path, fixed_peak):
    out = tmp_path / "sample.json"
    args = [*TINY, "--device", "cpu", "--grid", "2", "--batches", "1", "3", "--modes", "none", "static",
            "--repeats", "1", "--dtype", "bfloat16", "--json", str(out)]  # fmt: skip
    assert bench_sample.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["cache"], r["batch"]) for r in rows] == [("none", 1), ("static", 1), ("none", 3), ("static", 3)]
    by = {(r["cache"], r["batch"]): r for r in rows}
    for (cache, batch), r in by.items():
        assert r["x vs none@same batch"] == pytest.approx(r["images/s"] / by[("none", batch)]["images/s"])
        assert r["x vs batch 1"] == pytest.approx(r["images/s"] / by[(cache, 1)]["images/s"])
        assert r["tokens/s"] == pytest.approx(r["images/s"] * (4 + 2))  # 2x2 codes + <eoi> <eos>
        assert r["linear-layers bound"] > 0 and r["linear-layers bound"] == by[("none", batch)]["linear-layers bound"]
        assert 0 < r["linear+attention bound"] == by[("none", batch)]["linear+attention bound"]


def test_sample_bench_times_next_scale_images(tmp_path, fixed_peak):
    out = tmp_path / "sample.json"
    args = [*TINY, "--device", "cpu", "--grid", "4", "--scales", "1", "2", "4", "--batches", "1", "2",
            "--modes", "dynamic", "--repeats", "1", "--json", str(out)]  # fmt: skip
    assert bench_sample.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["cache"], r["batch"]) for r in rows] == [("dynamic", 1), ("dynamic", 2)]
    for r in rows:
        assert r["tokens/s"] == pytest.approx(r["images/s"] * 21)  # 1 + 4 + 16 codes, no <eoi> <eos>
        assert r["ms/decoding step"] == pytest.approx(1000 * r["s/call"] / 3)  # one forward per scale
    with pytest.raises(SystemExit):
        bench_sample.main([*args[:-2], "--modes", "static"])


def test_sample_bench_times_next_scale_beside_raster_in_one_run(tmp_path, fixed_peak):
    out = tmp_path / "sample.json"
    args = [*TINY, "--device", "cpu", "--grid", "4", "--scales", "1", "2", "4", "--batches", "1", "2",
            "--modes", "dynamic", "--beside-raster", "--raster-modes", "static", "dynamic", "--repeats", "1",
            "--json", str(out)]  # fmt: skip
    assert bench_sample.main(args) == 0
    table = json.loads(out.read_text())
    rows = table["rows"]
    assert [(r["model"], r["cache"], r["batch"]) for r in rows] == [
        ("raster", "static", 1), ("raster", "dynamic", 1), ("raster", "static", 2), ("raster", "dynamic", 2),
        ("next-scale", "dynamic", 1), ("next-scale", "dynamic", 2),
    ]  # fmt: skip
    by = {(r["model"], r["cache"], r["batch"]): r for r in rows}
    for r in rows:
        for mode in ("static", "dynamic"):
            expected = r["images/s"] / by[("raster", mode, r["batch"])]["images/s"]
            assert r[f"x vs raster {mode}"] == pytest.approx(expected)
    assert by[("raster", "static", 1)]["tokens/s"] == pytest.approx(by[("raster", "static", 1)]["images/s"] * 18)
    assert table["image_tokens"] == {"raster": 16, "next-scale": 21}
    with pytest.raises(SystemExit):  # nothing to compare without --scales
        bench_sample.main([*TINY, "--device", "cpu", "--grid", "4", "--beside-raster", "--modes", "dynamic"])
