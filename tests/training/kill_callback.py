"""Test-only callbacks that SIGKILL their own process: crashes nothing can clean up after."""

import os
import signal
from pathlib import Path

import lightning as L


class KillAt(L.Callback):
    """Dies as the optimizer step `step` begins (after the checkpoints of the steps before it)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillWhileSaving(L.Callback):
    """Dies halfway through writing last.ckpt after optimizer step `step`: half of its bytes are written
    (to wherever the checkpoint IO puts them), then the process is gone. Checkpoint callbacks run after
    the others, so the write this arms is that step's."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        from fsspec.implementations.local import LocalFileOpener

        write = LocalFileOpener.write

        def write_half_then_die(opener, data):
            if Path(opener.path).name != "last.ckpt":
                return write(opener, data)
            opener.f.write(bytes(data)[: len(data) // 2])
            opener.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        LocalFileOpener.write = write_half_then_die
