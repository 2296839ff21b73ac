"""Exact resume after SIGKILL, the distributed/resumable data order, the NaN guard, safe loading."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unimodal.data.order import EpochSampler
from unimodal.evaluation.compare import read_curves
from unimodal.training.fit import FiniteLossGuard, NonFiniteLossError

from .conftest import EXPERIMENTS, TINY_DATA

REPO = Path(__file__).resolve().parent.parent


def _tokenizer_fit(root: Path, cache: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    """Stage-1 fit in a fresh process, as a user runs it (log every step, checkpoint every 3)."""
    args = [
        sys.executable, "-m", "unimodal", "tokenizer", "fit", "--config", str(EXPERIMENTS / "tokenizer.yaml"),
        "--run.root", str(root), "--run.name", name, "--run.wandb", "disabled", "--run.checkpoint_every_n_steps", "3",
        "--data.source.cache_dir", str(cache), *TINY_DATA, "--model.model.codebook_size", "64",
        "--trainer.max_steps", "14", "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, hf_cache):
    # 256 images / batch 64 = 4 steps per epoch; the kill at step 7 is mid-epoch, last checkpoint at step 6
    whole = _tokenizer_fit(tmp_path, hf_cache, "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    kill = '--trainer.callbacks+={"class_path": "tests.kill_callback.KillAt", "init_args": {"step": 7}}'
    killed = _tokenizer_fit(tmp_path, hf_cache, "killed", kill)
    assert killed.returncode == -9, "the run was meant to die by SIGKILL"
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    resumed = _tokenizer_fit(tmp_path, hf_cache, "killed", "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a = dict(read_curves(tmp_path / "whole" / "csv" / "metrics.csv")["train/loss"])
    b = dict(read_curves(tmp_path / "killed" / "csv" / "metrics.csv")["train/loss"])
    steps = [s for s in sorted(b) if s >= 6]
    assert len(steps) >= 7
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-7), f"step {s}: uninterrupted {a[s]} vs resumed {b[s]}"


_KILLED_WHILE_SAVING = """
import os, signal, sys, torch
from fsspec.implementations.local import LocalFileOpener
from lightning.pytorch.plugins.io import TorchCheckpointIO

def write_half_then_die(self, data):
    self.f.write(bytes(data)[: len(data) // 2])
    self.f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

LocalFileOpener.write = write_half_then_die
TorchCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.ones(100_000)}, sys.argv[1])
"""


def test_a_kill_while_saving_leaves_the_previous_checkpoint_whole(tmp_path):
    """Lightning's checkpoint IO (what ModelCheckpoint uses) writes to a temporary file and renames it: a
    process SIGKILLed halfway through writing last.ckpt leaves the previous last.ckpt intact."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    last = tmp_path / "last.ckpt"
    TorchCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.zeros(100_000)}, last)
    killed = subprocess.run([sys.executable, "-c", _KILLED_WHILE_SAVING, str(last)], capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    kept = torch.load(last, weights_only=True)
    assert kept["global_step"] == 1 and torch.equal(kept["w"], torch.zeros(100_000))


def test_epoch_sampler_shards_global_batches_and_resumes():
    n, bs = 103, 8
    single = list(EpochSampler(n, bs * 2, seed=1))
    ranks = [list(EpochSampler(n, bs, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    # each global batch of the 1-process run is rank 0's slice followed by rank 1's
    for b in range(len(single) // (2 * bs)):
        global_batch = single[b * 2 * bs : (b + 1) * 2 * bs]
        assert global_batch == ranks[0][b * bs : (b + 1) * bs] + ranks[1][b * bs : (b + 1) * bs]
    seen = ranks[0] + ranks[1]
    assert len(seen) == len(set(seen)) == (n // (2 * bs)) * 2 * bs  # nothing twice, only the ragged tail dropped
    s = EpochSampler(n, bs, seed=1)
    s.set_epoch(3)
    full = list(s)
    s.resume(epoch=3, batches_done=5)
    assert list(s) == full[5 * bs :]
    assert list(s) == full  # the skip applies once
    s.set_epoch(4)
    assert list(s) != full
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochSampler(10, 8, world_size=2)


def test_nonfinite_loss_stops_before_backward(tmp_path):
    class Trainer:
        default_root_dir = str(tmp_path)
        global_step = 41

    with pytest.raises(NonFiniteLossError, match="loss became nan at step 41; no checkpoint was written yet"):
        FiniteLossGuard().on_before_backward(Trainer(), None, torch.tensor(float("nan")))
    FiniteLossGuard().on_before_backward(Trainer(), None, torch.tensor(1.0))  # finite: no error


def test_diverging_run_fails_with_one_line_and_keeps_checkpoints(tmp_path, hf_cache):
    run = _tokenizer_fit(tmp_path, hf_cache, "diverge", "--model.lr", "1e30", "--model.warmup_steps", "0")
    assert run.returncode == 1
    assert "unimodal tokenizer: error: loss became" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "diverge" / "export").exists()


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_resuming_from_a_pickled_payload_is_refused(tmp_path, hf_cache):
    bad = tmp_path / "evil.ckpt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": {}, "x": _Payload()}, f)
    run = _tokenizer_fit(tmp_path, hf_cache, "evil", "--ckpt_path", str(bad))
    assert run.returncode != 0
    assert not (REPO / "PWNED").exists() and not (tmp_path / "PWNED").exists()
    assert "unimodal tokenizer: error: refused to load a checkpoint that is not weights-only" in run.stderr
    assert "Traceback" not in run.stderr


def test_stage2_data_skips_bad_rows_and_handles_odd_captions(trained, tmp_path, caplog):
    import json

    from PIL import Image

    from unimodal.data.pairs import DataSource
    from unimodal.training.datamodules import SequenceDataModule

    folder = tmp_path / "odd"
    folder.mkdir()
    captions = ["", "a red circle " * 30, "猫 🐱 émoji", "plain caption"]
    rows = []
    for i, text in enumerate(captions):
        Image.new("LA", (48, 17)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "caption": text})
    (folder / "broken.png").write_bytes(b"not an image at all")
    rows.append({"file_name": "broken.png", "caption": "x"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = SequenceDataModule(
        image_tokenizer=str(trained["tokenizer"]), text_tokenizer=str(tmp_path / "bpe"),
        source=DataSource(name=str(folder), text_column="caption"), batch_size=2, val_split="train",
        max_text_tokens=16,
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    text = caplog.text
    assert "skipped 1 of 5 rows" in text and "exceed max_text_tokens=16" in text and "1 of 5 captions are empty" in text
    from unimodal.lm.grammar import SegmentGrammar

    g = SegmentGrammar(dm.vocab)
    assert len(dm.train_set) == 4 and all(g.is_valid(r["input_ids"]) for r in dm.train_set)


def test_bundle_with_mismatched_vocab_is_refused(bundle, tmp_path):
    import json

    from unimodal.generation.bundle import Bundle

    bundle.save(tmp_path / "b")
    vocab = json.loads((tmp_path / "b" / "vocab.json").read_text())
    vocab["image_size"] += 1
    (tmp_path / "b" / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="inconsistent.*image tokenizer has K="):
        Bundle.load(tmp_path / "b")


FUZZ_PROMPTS = ["a red circle at the top left", "", "   ", "🐱🐶", "日本語のキャプション", "x" * 500,
                "a " * 100, "\n\t", "<bos> <boi> <eoi>", "RED CIRCLE TOP LEFT"]  # fmt: skip
FUZZ_PARAMS = [dict(), dict(temperature=0.1), dict(temperature=5.0), dict(top_k=1), dict(top_k=10**6),
               dict(top_p=0.01), dict(top_p=1.0), dict(greedy=True), dict(temperature=0), dict(temperature=-1),
               dict(top_k=0), dict(top_p=0), dict(top_p=1.5), dict(images_per_prompt=0), dict(batch_size=0),
               dict(temperature=float("nan")), dict(images_per_prompt=3, batch_size=2)]  # fmt: skip


def test_fuzz_prompts_and_sampling_parameters(bundle):
    """Every combination either returns full images or raises a ValueError that says what is wrong."""
    from unimodal.generation.sampling import SamplingParams

    r = bundle.image_tokenizer.config.resolution
    accepted = refused = 0
    for i, kw in enumerate(FUZZ_PARAMS):
        prompts = [FUZZ_PROMPTS[i % len(FUZZ_PROMPTS)], FUZZ_PROMPTS[(i + 3) % len(FUZZ_PROMPTS)]]
        try:
            params = SamplingParams(seed=i, **kw)
        except ValueError as err:
            refused += 1
            assert any(
                name in str(err) for name in ("temperature", "top_k", "top_p", "images_per_prompt", "batch_size")
            ), err
            continue
        images = bundle.generate(prompts, params)
        assert images.shape == (2 * params.images_per_prompt, 3, r, r) and torch.isfinite(images).all()
        accepted += 1
    assert accepted >= 8 and refused >= 7 and accepted + refused == len(FUZZ_PARAMS)


def _transformer_fit(root: Path, cache: Path, tokenizer: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    args = [
        sys.executable, "-m", "unimodal", "transformer", "fit", "--config", str(EXPERIMENTS / "transformer.yaml"),
        "--run.root", str(root), "--run.name", name, "--run.wandb", "disabled", "--data.source.cache_dir", str(cache),
        *TINY_DATA, "--data.image_tokenizer", str(tokenizer), "--data.text_tokenizer", str(root / "bpe"),
        "--trainer.max_steps", "8", "--trainer.val_check_interval", "4", "--trainer.log_every_n_steps", "1",
        "--model.model.n_layers", "2", "--model.model.d_model", "64", "--model.model.ffn_hidden", "128",
        "--samples.prompts", "[]", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_ddp_on_two_cpu_processes_matches_one_process(trained, tmp_path, hf_cache):
    """Lightning's DDP (gloo) with 2 x 32 sequences equals 1 process with 64: same global batches."""
    single = _transformer_fit(tmp_path, hf_cache, trained["tokenizer"], "single", "--data.batch_size", "64")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _transformer_fit(
        tmp_path, hf_cache, trained["tokenizer"], "ddp", "--data.batch_size", "32",
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = read_curves(tmp_path / "single" / "csv" / "metrics.csv")
    b = read_curves(tmp_path / "ddp" / "csv" / "metrics.csv")
    print("single val/loss", a["val/loss"], "ddp val/loss", b["val/loss"])
    assert [s for s, _ in a["val/loss"]] == [s for s, _ in b["val/loss"]]
    for (_, x), (_, y) in zip(a["val/loss"], b["val/loss"]):
        # per-rank segment means differ slightly from global ones when caption lengths differ per rank
        assert x == pytest.approx(y, rel=2e-3)


def test_stage2_sigkill_then_resume_equals_uninterrupted_and_keeps_the_logged_rows(trained, tmp_path, hf_cache):
    """Stage 2 through the CLI: killed at step 7 (last checkpoint at 6), resumed with --ckpt_path, it logs the
    uninterrupted run's losses; metrics.csv still holds the rows logged before the kill."""
    every = ["--run.checkpoint_every_n_steps", "3"]
    whole = _transformer_fit(tmp_path, hf_cache, trained["tokenizer"], "whole", *every)
    assert whole.returncode == 0, whole.stderr[-3000:]
    kill = '--trainer.callbacks+={"class_path": "tests.kill_callback.KillAt", "init_args": {"step": 7}}'
    killed = _transformer_fit(tmp_path, hf_cache, trained["tokenizer"], "killed", *every, kill)
    assert killed.returncode == -9, "the run was meant to die by SIGKILL"
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    resumed = _transformer_fit(tmp_path, hf_cache, trained["tokenizer"], "killed", *every, "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = dict(read_curves(tmp_path / "whole" / "csv" / "metrics.csv")["train/loss"])
    b = dict(read_curves(tmp_path / "killed" / "csv" / "metrics.csv")["train/loss"])
    assert sorted(a) == sorted(b) == list(range(8))  # rows before the resume kept, none twice
    for s in sorted(a):
        assert a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-7), f"step {s}: uninterrupted {a[s]} vs resumed {b[s]}"


def test_stage1_ddp_on_two_cpu_processes_matches_one_process(tmp_path, hf_cache):
    """The image tokenizer under DDP (gloo, 2 x 32 images) ends with the weights of 1 process x 64. EMA codebook
    with dead-code restart and the entropy term: codebook init and restarts draw from the global batch with the
    same seeded draws, EMA statistics and the entropy term's mean assignment are all-reduced, gradients averaged."""
    from safetensors.torch import load_file

    steps = ["--trainer.max_steps", "6", "--model.model.quantizer", "ema", "--model.model.restart_window", "2",
             "--model.model.entropy_weight", "0.1"]  # fmt: skip
    single = _tokenizer_fit(tmp_path, hf_cache, "single", *steps, "--data.batch_size", "64")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _tokenizer_fit(
        tmp_path, hf_cache, "ddp", *steps, "--data.batch_size", "32",
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = load_file(tmp_path / "single" / "export" / "model.safetensors")
    b = load_file(tmp_path / "ddp" / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max() / (a[k].float().abs().max() + 1e-8)) for k in a)
    print("largest relative weight difference, DDP vs 1 process:", worst)
    assert worst < 1e-3


def test_streaming_shards_cover_the_epoch_once_across_two_ranks():
    import datasets

    from unimodal.data.order import StreamingShard, to_stream

    ds = datasets.Dataset.from_dict({"idx": list(range(103))})
    for shards in (8, 5):  # shards divisible by the world size, and not
        ranks = [
            StreamingShard(to_stream(ds, shards), rank, 2, seed=0, buffer_size=16, transform=lambda r: r["idx"])
            for rank in (0, 1)
        ]
        epochs = []
        for _ in range(2):
            seen = [i for part in ranks for i in part]
            assert sorted(seen) == list(range(103)), f"{shards} shards: a sample was skipped or seen twice"
            epochs.append(seen)
        assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_streaming_fit_runs_both_stages(trained, tmp_path, hf_cache):
    from .conftest import fit_tokenizer, fit_transformer

    tok = fit_tokenizer(tmp_path, hf_cache, steps=6, name="stream-tok", extra=["--data.streaming", "true"])
    assert (tok / "model.safetensors").is_file()
    bundle = fit_transformer(tmp_path, hf_cache, trained["tokenizer"], steps=6, name="stream-lm",
                             extra=["--data.streaming", "true"])  # fmt: skip
    assert (bundle / "bundle.json").is_file()
