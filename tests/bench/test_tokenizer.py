"""`bench tokenizer`: encode/decode throughput of every quantizer variant at every batch size."""

import json

from unimodal.bench import tokenizer as bench


def test_tokenizer_benchmark_reports_every_batch_size(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "measured_peak_flops", lambda device: 1e9)  # the 2048^3 matmuls take seconds on a CPU
    out = tmp_path / "bench.json"
    assert bench.main(["--variants", "fsq", "vq", "--batch-sizes", "1", "4", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["quantizer"], r["batch"]) for r in rows] == [("fsq", 1), ("fsq", 4), ("vq", 1), ("vq", 4)]
    assert all(r["encode img/s"] > 0 and r["decode img/s"] > 0 for r in rows)
