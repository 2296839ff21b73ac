"""Lightning's DDP on two CPU processes (gloo) trains what one process trains on the same global batches."""

import pytest
from safetensors.torch import load_file

from unimodal.evaluation.compare import read_curves


@pytest.fixture(scope="module")
def ddp(stage1, stage2) -> dict:
    """Both stages' DDP fits (2 x 32 per step), finished; their runs are named 'ddp' in each stage's folder."""
    code, output = stage2["ddp"].result()
    assert code == 0, output
    return {"stage1": stage1["root"] / "ddp", "stage2": stage2["root"] / "ddp"}


@pytest.mark.slow
def test_stage1_ddp_on_two_cpu_processes_matches_one_process(stage1, ddp):
    """The image tokenizer under DDP (2 x 32 images) ends with the weights of 1 process x 64. EMA codebook
    with dead-code restart and the entropy term: codebook init and restarts draw from the global batch with the
    same seeded draws, EMA statistics and the entropy term's mean assignment are all-reduced, gradients averaged."""
    a = load_file(stage1["root"] / "whole" / "export" / "model.safetensors")
    b = load_file(ddp["stage1"] / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max() / (a[k].float().abs().max() + 1e-8)) for k in a)
    print("largest relative weight difference, DDP vs 1 process:", worst)
    assert worst < 1e-3


@pytest.mark.slow
def test_stage2_ddp_on_two_cpu_processes_matches_one_process(stage2, ddp):
    """The transformer under DDP (2 x 32 sequences) logs the validation losses of 1 process x 64."""
    a = read_curves(stage2["root"] / "whole" / "csv" / "metrics.csv")
    b = read_curves(ddp["stage2"] / "csv" / "metrics.csv")
    print("single val/loss", a["val/loss"], "ddp val/loss", b["val/loss"])
    assert [s for s, _ in a["val/loss"]] == [s for s, _ in b["val/loss"]] and len(a["val/loss"]) == 2
    for (_, x), (_, y) in zip(a["val/loss"], b["val/loss"]):
        # per-rank segment means differ slightly from global ones when caption lengths differ per rank
        assert x == pytest.approx(y, rel=2e-3)
