"""The benchmarks run end to end on tiny models and report consistent tables (not their speed)."""

import ctypes
import json
import math
import subprocess
import sys

import pytest
import torch

from unimodal.bench import __main__ as bench_cli
from unimodal.bench import profile as bench_profile
from unimodal.bench import sample as bench_sample
from unimodal.bench import train as bench_train

TINY = ["--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--ffn-hidden", "64"]


@pytest.fixture
def fixed_peak(monkeypatch):
    """The 2048^3 peak matmuls take seconds here; a fixed peak keeps MFU checkable."""

    def peak(device="cpu", dtype=None):
        return 1e10 if dtype is None else 4e10  # fp32 (the default), bf16

    for module in (bench_train, bench_sample):
        monkeypatch.setattr(module, "measured_peak_flops", peak)


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


def test_profile_refuses_compile_without_the_static_cache(capsys):
    with pytest.raises(SystemExit):
        bench_profile.main(["sample", "--batch", "1", "--grid", "2", "--compile"])
    assert "compile needs cache='static'" in capsys.readouterr().err


def test_bench_names_its_subcommands_and_refuses_unknown_ones(capsys):
    assert bench_cli.main(["--help"]) == 0
    assert bench_cli.main(["nonsense"]) == 2
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("train", "sample", "tokenizer", "data", "profile"))


def test_compiled_training_forward_matches_eager_and_keeps_the_state_dict(monkeypatch):
    """`model.compile: true` changes how the loss runs, not what it computes or what is saved. The graph is
    captured by dynamo and AOT autograd as in a real run; inductor's code generation (40 s here) is left out."""
    from functools import partial

    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="aot_eager"))
    from unimodal.bench.train import synthetic_batches
    from unimodal.lm.transformer import TransformerConfig
    from unimodal.lm.vocab import JointVocab
    from unimodal.training.modules import TransformerModule

    vocab = JointVocab(text_size=64, image_size=16, image_grid=(2, 2), max_text_tokens=8)
    config = TransformerConfig(n_layers=1, d_model=32, n_heads=2, ffn_hidden=64)
    batch = synthetic_batches(vocab, 2, 5, 1)[0]
    losses, grads = [], []
    for compile in (False, True):
        torch.manual_seed(0)
        module = TransformerModule(vocab=vocab, model=config, compile=compile)
        loss, _ = module._loss(batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in module.model.parameters()]))
        keys = list(module.state_dict())
        assert keys == [f"model.{k}" for k in module.model.state_dict()]  # no compiled copy saved
    assert module._compiled is not None and module._model() is module._compiled[1]  # the compiled twin ran
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("target", ["train", "sample", "profile"])
def test_bench_refuses_a_model_size_the_config_refuses_in_one_line(target, capsys):
    from unimodal.bench.__main__ import main as bench_main

    args = [target] + (["sample"] if target == "profile" else []) + ["--n-heads", "4", "--n-kv-heads", "3"]
    with pytest.raises(SystemExit) as exit_info:
        bench_main(args)
    assert exit_info.value.code == 2
    assert "n_kv_heads (3) must be positive and divide n_heads (4)" in capsys.readouterr().err


_MALLOC_PROBE = """
import ctypes, sys
from unimodal.generation.fast.host import keep_freed_memory
class Info(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
before = libc.mallinfo2().hblkhd
block = libc.malloc(3 << 20)
print(kept, libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_serves_a_few_megabytes_from_the_heap_not_fresh_pages():
    """By default glibc maps a 3 MB block as fresh pages from the OS (page faults when first written);
    after `keep_freed_memory` it comes from the heap. Fresh processes: this one's thresholds have moved."""
    try:
        has_mallinfo2 = hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc >= 2.33
    except OSError:
        has_mallinfo2 = False
    if not has_mallinfo2:
        pytest.skip("not glibc >= 2.33")

    def probe(mode):
        out = subprocess.run([sys.executable, "-c", _MALLOC_PROBE, mode], capture_output=True, text=True, check=True)
        kept, mapped = out.stdout.split()
        return kept, int(mapped)

    kept, mapped = probe("default")
    assert kept == "None" and mapped >= 3 << 20
    assert probe("keep") == ("True", 0)
