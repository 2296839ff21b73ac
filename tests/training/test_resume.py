"""Resuming: a fit SIGKILLed mid-run (even while writing its checkpoint) and resumed with --ckpt_path
equals the uninterrupted fit; resuming refuses pickled code and takes this run's optimizer settings."""

import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

from unimodal.cli.main import main
from unimodal.evaluation.compare import read_curves

from ..conftest import REPO, tokenizer_args


def _losses(run_dir) -> dict[int, float]:
    return dict(read_curves(run_dir / "csv" / "metrics.csv")["train/loss"])


def _assert_same_losses(whole: dict[int, float], resumed: dict[int, float], steps: list[int]):
    for s in steps:
        assert resumed[s] == pytest.approx(whole[s], rel=1e-5, abs=1e-7), f"step {s}: {whole[s]} vs {resumed[s]}"


@pytest.mark.slow
def test_stage1_killed_while_writing_its_checkpoint_resumes_from_the_previous_one_exactly(stage1):
    """Stage 1 through the CLI, SIGKILLed halfway through writing last.ckpt after step 4: the checkpoint
    IO writes to a temporary file and renames it, so last.ckpt is still the whole one of step 2 (mid-epoch).
    Resumed from it with --ckpt_path, the fit logs the uninterrupted run's losses and exports its weights."""
    from unimodal.training.fit import TokenizerCLI

    root, args = stage1["root"], stage1["args"]
    code, output = stage1["killed"].result()
    assert code == -9, "the run was meant to die by SIGKILL:\n" + output
    last = root / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 2
    TokenizerCLI(args=args("killed", "--ckpt_path", str(last)))
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 6
    resumed = _losses(root / "killed")
    assert [s for s in sorted(resumed) if s >= 2] == list(range(2, 6))
    _assert_same_losses(_losses(root / "whole"), resumed, list(range(2, 6)))
    whole = load_file(root / "whole" / "export" / "model.safetensors")
    again = load_file(root / "killed" / "export" / "model.safetensors")
    assert whole.keys() == again.keys()
    for key in whole:
        torch.testing.assert_close(again[key], whole[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_stage2_killed_then_resumed_equals_uninterrupted_and_keeps_the_logged_rows(stage2):
    """Stage 2 through the CLI: killed at step 7 (last checkpoint at 6), resumed with --ckpt_path, it logs the
    uninterrupted run's losses; metrics.csv still holds the rows logged before the kill, none twice."""
    from unimodal.training.fit import TransformerCLI

    root, args = stage2["root"], stage2["args"]
    code, output = stage2["killed"].result()
    assert code == -9, "the run was meant to die by SIGKILL:\n" + output
    TransformerCLI(args=args("killed", "--ckpt_path", str(root / "killed" / "checkpoints" / "last.ckpt")))
    whole, resumed = _losses(root / "whole"), _losses(root / "killed")
    assert sorted(whole) == sorted(resumed) == list(range(8))
    _assert_same_losses(whole, resumed, list(range(8)))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_resuming_from_a_pickled_payload_is_refused(tmp_path, hf_cache, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.ckpt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": {}, "x": _Payload()}, f)
    args = tokenizer_args(tmp_path, hf_cache, "evil", "--trainer.max_steps", "2", "--ckpt_path", str(bad))
    assert main(["tokenizer", *args]) == 1
    assert not (REPO / "PWNED").exists() and not (tmp_path / "PWNED").exists()
    err = capsys.readouterr().err
    assert "unimodal tokenizer: error: refused to load a checkpoint that is not weights-only" in err
    assert "Traceback" not in err


def test_a_resumed_optimizer_takes_this_runs_fused_setting_not_the_checkpoints():
    """torch restores each optimizer group's settings from the checkpoint; a GPU run's `fused=True`
    resumed on a CPU (or under fp16, where clipping refuses fused) must be turned back off."""
    import lightning as L

    from unimodal.training.modules import TokenizerModule

    module = TokenizerModule()
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    checkpoint = {"optimizer_states": [{"state": {}, "param_groups": [{"params": [0], "fused": True}]}]}
    module.on_load_checkpoint(checkpoint)
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["fused"] is None
    TokenizerModule().on_load_checkpoint(checkpoint)  # no trainer (load_from_checkpoint): nothing to do
