"""Training data order that is exact across resumes and the same on 1 or N processes.

`EpochSampler` draws one permutation per (seed, epoch), cuts it into *global* batches of
`batch_size * world_size` samples and gives each rank its slice of every global batch. So:

- a run on 2 processes with batch 32 sees exactly the global batches a 1-process run with batch
  64 sees (DDP averages the gradients: same update, up to float rounding);
- a resumed run skips the batches its checkpoint had consumed and continues with the same order.

`ResumableData` is the DataModule side: Lightning saves `state_dict()` in every checkpoint and
calls `load_state_dict()` before `train_dataloader()` when resuming.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler[int]):
    def __init__(
        self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ):
        if n < batch_size * world_size:
            raise ValueError(
                f"the training split has {n} samples, fewer than one global batch ({batch_size} x {world_size} "
                "processes); lower data.batch_size or use more data"
            )
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip = 0  # local batches of `epoch` already consumed (set when resuming)
        self._skip_epoch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)  # the ragged tail is dropped

    def set_epoch(self, epoch: int):
        """Lightning calls this at the start of every epoch."""
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int):
        self.epoch, self._skip_epoch, self.skip = epoch, epoch, batches_done

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(self.n)
        start = self.skip if self.epoch == self._skip_epoch else 0
        g = self.batch_size * self.world_size
        for b in range(start, self.batches_per_epoch):
            chunk = order[b * g : (b + 1) * g]
            yield from chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
        self.skip = 0  # only the first epoch after a resume is shortened

    def __len__(self) -> int:
        # The full epoch, also when resuming mid-epoch: Lightning's epoch length stays the same.
        return self.batches_per_epoch * self.batch_size


class _PositionedLoader(DataLoader):
    """A DataLoader Lightning treats as resumable: its position lives in the DataModule's checkpoint
    state (`ResumableData.state_dict`), which knows how many batches training consumed, unlike the
    loader, which is read ahead by Lightning's prefetching."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


class ResumableData:
    """Mixin for LightningDataModules: exact, distributed-aware training order and its checkpoint state,
    and both loaders. The data module provides `train_set`/`train_stream`, `val_set`, `batch_size`,
    `num_workers`, `_collate` and `_stream_item`."""

    seed: int = 0
    streaming: bool = False
    stream_shards: int = 16
    stream_buffer: int = 1000
    pin_memory: bool | None = None
    _resume: tuple[int, int] | None = None

    def _pin(self) -> bool:
        """Page-locked batches speed up host-to-GPU copies; `None` pins when a CUDA device is present."""
        return torch.cuda.is_available() if self.pin_memory is None else self.pin_memory

    def streaming_loader(self, stream, transform, batch_size: int, num_workers: int, collate_fn) -> DataLoader:
        """Training batches from a `datasets` IterableDataset: this rank's shards, shuffled through a buffer."""
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        shard = StreamingShard(
            to_stream(stream, self.stream_shards), rank, world, self.seed, self.stream_buffer, transform
        )
        return DataLoader(shard, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn, drop_last=True,
                          pin_memory=self._pin())  # fmt: skip

    def resumable_loader(self, dataset, batch_size: int, num_workers: int, collate_fn) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = EpochSampler(len(dataset), batch_size, self.seed, True, rank, world)
        if self._resume is not None:
            sampler.resume(*self._resume)
            self._resume = None
        return _PositionedLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            persistent_workers=num_workers > 0,
            drop_last=True,
            pin_memory=self._pin(),
        )

    def train_dataloader(self) -> DataLoader:
        if self.streaming:
            return self.streaming_loader(
                self.train_stream, self._stream_item, self.batch_size, self.num_workers, self._collate
            )
        return self.resumable_loader(self.train_set, self.batch_size, self.num_workers, self._collate)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation split's loader, followed by one per `extra_val_sets` entry if the module has any."""
        sets = [self.val_set, *getattr(self, "extra_val_sets", {}).values()]
        loaders = [
            DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self._collate,
                       persistent_workers=self.num_workers > 0, pin_memory=self._pin())
            for ds in sets
        ]  # fmt: skip
        return loaders[0] if len(loaders) == 1 else loaders

    def state_dict(self) -> dict:
        """Where training is in the data: epoch and batches already used in it (primitives only)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or self.streaming:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        # `processed` counts the batch whose on_train_batch_end is saving this checkpoint
        return {"epoch": trainer.current_epoch, "batches_done": progress.processed, "seed": self.seed}

    def load_state_dict(self, state: dict):
        if state:
            if state.get("seed", self.seed) != self.seed:
                raise ValueError(f"checkpoint was trained with data seed {state['seed']}, this run has {self.seed}")
            self._resume = (state["epoch"], state["batches_done"])


class StreamingShard(torch.utils.data.IterableDataset):
    """This process's share of a `datasets` IterableDataset, reshuffled every pass.

    `split_dataset_by_node` hands each rank whole shards (or every world_size-th example when the
    shards do not divide evenly), so across ranks no example is seen twice or skipped in an epoch.
    Streaming runs are exact per epoch but resume at an epoch boundary (mid-epoch position is not saved).
    """

    def __init__(self, stream, rank: int, world_size: int, seed: int, buffer_size: int, transform):
        from datasets.distributed import split_dataset_by_node

        self.stream = split_dataset_by_node(stream, rank=rank, world_size=world_size).shuffle(
            seed=seed, buffer_size=buffer_size
        )
        self.transform = transform
        self.epoch = 0

    def __iter__(self):
        self.stream.set_epoch(self.epoch)
        self.epoch += 1
        for row in self.stream:
            item = self.transform(row)
            if item is not None:  # unreadable rows are skipped
                yield item


def to_stream(dataset, num_shards: int):
    """A map-style `datasets.Dataset` as a sharded IterableDataset (streaming sources already are one)."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        return dataset
    return dataset.to_iterable_dataset(num_shards=min(num_shards, len(dataset)))
