"""The measured matmul peak is the best of what it timed, and no benchmark prints an MFU above 1."""

import json

import pytest
import torch

from unimodal.bench import common
from unimodal.bench import train as bench_train
from unimodal.bench.common import PEAK_DISTURBED, PEAK_DISTURBED_MESSAGE, PeakConfig, PeakFlops


@pytest.fixture
def fake_timer(monkeypatch):
    """Replaces the matmul timer: `seconds(n, threads, round)` decides each matmul's time; returns the log
    of (n, threads, FLOP/s) it handed out."""
    log, calls = [], {}

    def install(seconds):
        def timer(a, b, device):
            n, threads = a.shape[0], torch.get_num_threads()
            calls[n, threads] = calls.get((n, threads), 0) + 1
            s = seconds(n, threads, calls[n, threads])
            log.append((n, threads, 2 * n**3 / s))
            return s

        monkeypatch.setattr(common, "_matmul_seconds", timer)
        return log

    return install


def test_the_peak_is_the_best_rate_over_every_size_thread_count_and_round(fake_timer):
    original = torch.get_num_threads()
    # every matmul runs at 1 GFLOP/s except the 16^3 one on 1 thread in its second round (5 GFLOP/s);
    # the probe (the smallest side, first) is call 1 of (8, 2) here, so rounds of (8, 2) are shifted by one
    best = {(16, 1, 2): 5e9}
    log = fake_timer(lambda n, t, call: 2 * n**3 / best.get((n, t, call), 1e9))
    peak = common.measured_peak_flops("cpu", sizes=(8, 16, 32), threads=(2, 1), repeats=3)
    assert float(peak) == pytest.approx(max(flops for *_, flops in log)) == pytest.approx(5e9)
    assert peak.config == PeakConfig(16, "fp32", 1, 2, pytest.approx(2 * 16**3 / 5e9))
    assert peak.timed == len(log) == 1 + 3 * 6  # the probe, then 3 sizes x 2 thread counts x 3 rounds
    assert {(n, t) for n, t, _ in log} == {(n, t) for n in (8, 16, 32) for t in (2, 1)}
    assert torch.get_num_threads() == original  # restored
    assert "fp32 16^3 matmul, 1 thread, round 2" in peak.describe()
    assert peak.as_dict()["size"] == 16 and peak.as_dict()["flops"] == pytest.approx(5e9)


def test_a_later_round_or_a_larger_matmul_wins_when_it_is_faster(fake_timer):
    log = fake_timer(lambda n, t, call: 2 * n**3 / (n * 1e8 + call))  # larger and later is faster
    peak = common.measured_peak_flops("cpu", sizes=(8, 32, 16), threads=(1,), repeats=4)
    assert (peak.config.size, peak.config.threads, peak.config.repeat) == (32, 1, 4)
    assert float(peak) == pytest.approx(max(flops for *_, flops in log))


def test_a_matmul_that_would_overrun_the_budget_is_halved_until_it_fits(fake_timer, monkeypatch):
    monkeypatch.setattr(common, "PROBE_SIZE", 4)
    log = fake_timer(lambda n, t, call: n**2 * 1e-3)  # 2000 n FLOP/s: 64^3 would take ~65 s at the probe's rate
    peak = common.measured_peak_flops("cpu", sizes=(64,), threads=(1,), repeats=2, budget_s=1.0)
    # the probe; round 1: 64 halved to 8 (16 would take ~1.02 s at the probe's rate); round 2: 8's faster
    # rate predicts 16 at ~0.5 s. 64 and 32 never run.
    assert [n for n, *_ in log] == [4, 8, 16]
    assert peak.config.size == 16 and peak.config.repeat == 2


def test_an_mfu_above_1_is_refused_in_its_cell_with_one_line(tmp_path, capsys):
    rows = [
        {"loop": "a", "tokens/s": 10.0, "MFU (fp32 peak)": 1.068, "linear-layers bound": 0.5},
        {"loop": "b", "tokens/s": 5.0, "MFU (fp32 peak)": 0.534, "linear-layers bound": 1.2},
    ]
    out = tmp_path / "t.json"
    common.print_table("t", rows, str(out), {"peak_flops": 1.0})
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert f"| a | 10 | {PEAK_DISTURBED} | 0.5 |" in lines
    assert f"| b | 5 | 0.534 | {PEAK_DISTURBED} |" in lines
    assert "1.068" not in printed and "1.2 " not in printed
    assert lines.count(PEAK_DISTURBED_MESSAGE) == 1 and "Traceback" not in printed
    saved = json.loads(out.read_text())
    assert saved["peak_disturbed"] is True
    assert saved["rows"][0]["MFU (fp32 peak)"] is None and saved["rows"][1]["MFU (fp32 peak)"] == 0.534
    assert rows[0]["MFU (fp32 peak)"] == 1.068  # the caller's rows are left as they were


def test_an_mfu_of_at_most_1_prints_as_is(capsys):
    common.print_table("t", [{"loop": "a", "MFU": 1.0}, {"loop": "b", "MFU": None}])
    printed = capsys.readouterr().out
    assert "| a | 1 |" in printed and PEAK_DISTURBED not in printed and PEAK_DISTURBED_MESSAGE not in printed


def test_train_bench_names_the_peak_matmul_and_refuses_mfu_above_1(monkeypatch, tmp_path, capsys):
    # a peak of 1 FLOP/s: every row would claim an MFU in the millions
    fake = PeakFlops(1.0, PeakConfig(2048, "fp32", 2, 3, 0.1), timed=13, elapsed=3.2)
    monkeypatch.setattr(bench_train, "measured_peak_flops", lambda device, dtype=None: fake)
    args = ["--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--ffn-hidden", "64", "--device", "cpu",
            "--batch-size", "2", "--grid", "2", "--steps", "2", "--warmup", "1", "--accumulate", "0"]  # fmt: skip
    out = tmp_path / "train.json"
    assert bench_train.main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "measured fp32 peak 0.0 GFLOP/s (best of 13 timed: fp32 2048^3 matmul, 2 threads, round 3" in printed
    assert printed.count(PEAK_DISTURBED) == 3 and printed.count(PEAK_DISTURBED_MESSAGE) == 1
    saved = json.loads(out.read_text())
    assert all(r["MFU (fp32 peak)"] is None for r in saved["rows"])
    assert saved["peak"]["size"] == 2048 and saved["peak"]["repeat"] == 3
