"""The benchmarks run end to end on tiny models and report consistent tables (not their speed)."""

import json
import math

import pytest

from unimodal.bench import __main__ as bench_cli
from unimodal.bench import profile as bench_profile
from unimodal.bench import sample as bench_sample
from unimodal.bench import train as bench_train

TINY = ["--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--ffn-hidden", "64"]


@pytest.fixture
def fixed_peak(monkeypatch):
    """The 2048^3 peak matmuls take seconds here; a fixed peak keeps MFU checkable."""
    for module in (bench_train, bench_sample):
        monkeypatch.setattr(module, "measured_peak_flops", lambda device="cpu": 1e10)


def test_train_bench_times_every_loop_on_the_same_model(tmp_path, fixed_peak):
    out = tmp_path / "train.json"
    args = [*TINY, "--device", "cpu", "--batch-size", "4", "--grid", "4", "--steps", "4", "--warmup", "1", "--bf16"]
    assert bench_train.main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    loops = [r["loop"] for r in result["rows"]]
    assert loops == ["bare PyTorch", "bare PyTorch, fused AdamW", "Lightning Trainer.fit",
                     "bare PyTorch, bf16 autocast", "Lightning, bf16-mixed"]  # fmt: skip
    tokens = 4 * result["seq_len"]
    for r in result["rows"]:
        assert r["tokens/s"] == pytest.approx(tokens / (r["step ms"] / 1000))
        assert r["MFU (fp32 peak)"] == pytest.approx(r["tokens/s"] * result["flops_per_token"] / 1e10)
    assert result["lightning_over_bare"] == pytest.approx(result["rows"][2]["tokens/s"] / result["rows"][0]["tokens/s"])
    assert result["device"] == "cpu" and result["stage1_images_per_s"] > 0


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


def test_profile_splits_wall_time_into_operators_and_python(tmp_path):
    out = tmp_path / "profile.json"
    assert bench_profile.main(["sample", "--batch", "2", "--grid", "2", "--top", "5", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert 0 < summary["aten share of wall"] <= 1.5  # profiler and wall clock disagree a little, not by 50%
    assert result["operators"] and all(math.isfinite(r["self ms"]) for r in result["operators"])
    assert len(result["rows"]) == 5


def test_bench_names_its_subcommands_and_refuses_unknown_ones(capsys):
    assert bench_cli.main(["--help"]) == 0
    assert bench_cli.main(["nonsense"]) == 2
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("train", "sample", "tokenizer", "data", "profile"))
