"""The data order: global batches sharded over ranks, resumable mid-epoch, streaming shards covering an epoch once."""

import datasets
import pytest

from unimodal.data.order import EpochSampler, StreamingShard, to_stream


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


def test_streaming_shards_cover_the_epoch_once_across_two_ranks():
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
