"""The fits the resume and DDP tests compare: an uninterrupted one-process fit of each stage ('whole'), fits
in fresh processes that are SIGKILLed ('killed'), and both stages under DDP on two CPU processes ('ddp').
Each is paid once; the fresh processes run while this one trains (one thread each: two cores, both busy)."""

from __future__ import annotations

import json
import sys

import pytest

from ..conftest import Started, start_unimodal, tokenizer_args, transformer_args, warn_if_built_twice

# Stage 1, logging every step and checkpointing every 2: 256 images / batch 64 (set here, whatever the shipped
# recipe's batch) = 4 steps per epoch, so 6 steps cross an epoch boundary. The EMA codebook with dead-code
# restart and the entropy term is the quantizer whose state (EMA statistics, usage counters, restart draws)
# has the most to carry over.
STAGE1 = [
    "--data.batch_size", "64",
    "--model.model.quantizer", "ema", "--model.model.restart_window", "2", "--model.model.entropy_weight", "0.1",
    "--trainer.max_steps", "6", "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
    "--run.checkpoint_every_n_steps", "2",
]  # fmt: skip
# Stage 2: 8 steps of batch 64 (4 per epoch), validation every 4, a checkpoint every 3.
STAGE2 = [
    "--trainer.max_steps", "8", "--trainer.val_check_interval", "4", "--trainer.log_every_n_steps", "1",
    "--run.checkpoint_every_n_steps", "3", "--samples.prompts", "[]",
]  # fmt: skip
# 2 ranks x 32 = the one process's batch of 64
DDP = ["--data.batch_size", "32", "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
KILL_WHILE_SAVING = (
    '--trainer.callbacks+={"class_path": "tests.training.kill_callback.KillWhileSaving", "init_args": {"step": 4}}'
)
KILL_AT_STEP_7 = '--trainer.callbacks+={"class_path": "tests.training.kill_callback.KillAt", "init_args": {"step": 7}}'


@pytest.fixture(scope="session")
def stage1(tmp_path_factory, hf_cache):
    """{'root', 'args' (run name -> its arguments), 'killed' (the started fit that dies halfway through writing
    last.ckpt after step 4)}; the 'whole' fit is done."""
    from unimodal.training.fit import TokenizerCLI

    warn_if_built_twice(tmp_path_factory, "stage1")
    root = tmp_path_factory.mktemp("stage1")

    def args(name: str, *extra: str) -> list[str]:
        return tokenizer_args(root, hf_cache, name, *STAGE1, *extra)

    killed = start_unimodal(root / "killed.log", "tokenizer", *args("killed", KILL_WHILE_SAVING))
    try:
        TokenizerCLI(args=args("whole"))
        yield {"root": root, "args": args, "killed": killed}
    finally:
        killed.stop()


@pytest.fixture(scope="session")
def stage2(tmp_path_factory, hf_cache, stage1):
    """As `stage1` for the transformer on stage 1's tokenizer ('killed' dies at step 7, its last checkpoint at
    6), and 'ddp': both stages' DDP fits started in one pair of processes."""
    from unimodal.training.fit import TransformerCLI

    root = tmp_path_factory.mktemp("stage2")

    def args(name: str, *extra: str) -> list[str]:
        return transformer_args(root, hf_cache, stage1["root"] / "whole" / "export", name, *STAGE2, *extra)

    TransformerCLI(args=args("whole"))  # first: it trains the BPE tokenizer the other runs here share
    killed = start_unimodal(root / "killed.log", "transformer", *args("killed", KILL_AT_STEP_7))
    pair = {"tokenizer": stage1["args"]("ddp", *DDP), "transformer": args("ddp", *DDP)}
    ddp = Started([sys.executable, "-m", "tests.training.ddp_pair", json.dumps(pair)], root / "ddp.log")
    try:
        yield {"root": root, "args": args, "killed": killed, "ddp": ddp}
    finally:
        killed.stop()
        ddp.stop()
