"""`bench train`: every training loop timed on the same model, with consistent throughput and MFU columns."""

import json

import pytest

from unimodal.bench import train as bench_train

from .conftest import TINY


def test_train_bench_times_every_loop_on_the_same_model(tmp_path, fixed_peak):
    out = tmp_path / "train.json"
    args = [*TINY, "--device", "cpu", "--batch-size", "4", "--grid", "4", "--steps", "4", "--warmup", "1", "--bf16",
            "--accumulate", "2"]  # fmt: skip
    assert bench_train.main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    loops = [r["loop"] for r in result["rows"]]
    assert loops == ["bare PyTorch", "bare PyTorch, fused AdamW", "Lightning Trainer.fit",
                     "bare PyTorch, bf16 autocast", "Lightning, bf16-mixed",
                     "Lightning, accumulate 2 (step ms: per batch of 2)"]  # fmt: skip
    tokens = 4 * result["seq_len"]
    for r in result["rows"]:
        per_step = tokens // 2 if "accumulate" in r["loop"] else tokens  # the accumulate row times half batches
        assert r["tokens/s"] == pytest.approx(per_step / (r["step ms"] / 1000))
        assert r["MFU (fp32 peak)"] == pytest.approx(r["tokens/s"] * result["flops_per_token"] / 1e10)
        if "bf16" in r["loop"]:  # bf16 rows also against the bf16 peak (4e10 here)
            assert r["MFU (bf16 peak)"] == pytest.approx(r["MFU (fp32 peak)"] / 4)
        else:
            assert r["MFU (bf16 peak)"] is None
    assert result["lightning_over_bare"] == pytest.approx(result["rows"][2]["tokens/s"] / result["rows"][0]["tokens/s"])
    assert result["device"] == "cpu" and result["stage1_images_per_s"] > 0


def test_train_bench_refuses_a_negative_accumulation_or_one_that_does_not_divide_the_batch(capsys):
    with pytest.raises(SystemExit):
        bench_train.main([*TINY, "--batch-size", "4", "--accumulate", "3", "--steps", "2", "--warmup", "1"])
    assert "not divisible by --accumulate 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_train.main([*TINY, "--batch-size", "4", "--accumulate", "-2", "--steps", "2", "--warmup", "1"])
    assert "--accumulate must be >= 0" in capsys.readouterr().err
