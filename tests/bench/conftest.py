"""Shared by the benchmark tests: tiny model arguments and a fixed peak."""

import pytest

from unimodal.bench import sample as bench_sample
from unimodal.bench import train as bench_train

TINY = ["--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--ffn-hidden", "64"]


@pytest.fixture
def fixed_peak(monkeypatch):
    """The 2048^3 peak matmuls take seconds on a CPU; a fixed peak keeps MFU checkable."""

    def peak(device="cpu", dtype=None):
        return 1e10 if dtype is None else 4e10  # fp32 (the default), bf16

    for module in (bench_train, bench_sample):
        monkeypatch.setattr(module, "measured_peak_flops", peak)
