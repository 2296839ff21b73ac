"""`unimodal demo --quick`: every step of the pipeline runs, with W&B offline."""

import pytest
from PIL import Image

from unimodal.cli import demo


@pytest.mark.slow
def test_quick_demo_runs_every_step_with_offline_wandb(tmp_path, monkeypatch):
    # the quick recipe's own flags with fewer steps and images (one validation): the pipeline is under test
    quick = dict(zip(demo.QUICK[::2], demo.QUICK[1::2]))
    tiny = {"--trainer.max_steps": "10", "--trainer.val_check_interval": "10", "--data.source.shapes.train_size": "256"}
    assert set(tiny) <= set(quick)
    quick |= tiny
    monkeypatch.setattr(demo, "QUICK", [item for pair in quick.items() for item in pair])
    monkeypatch.setattr(demo, "QUICK_JUDGE", {"train_images": 256, "epochs": 1})
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    summary = demo.run_demo(tmp_path / "demo", wandb="offline", quick=True)
    out = tmp_path / "demo"
    assert Image.open(out / "samples.png").size[0] > 0
    assert (out / "eval_test.json").is_file() and (out / "compare" / "compare.md").is_file()
    assert list((out / "runs" / "shapes-transformer" / "wandb").glob("offline-run-*"))
    assert set(summary["caption_fidelity"]) == {"test", "heldout"}
