"""The communication layer: packed allreduce, counters, gather, broadcast, agreement."""

from __future__ import annotations

import pytest
import torch

from hpcopt.comm import Communicator, PackedBuffer
from hpcopt.errors import ConfigError

pytestmark = pytest.mark.timeout(60)


def test_serial_world_is_size_one() -> None:
    comm = Communicator()
    buffer = torch.arange(5, dtype=torch.float32)
    comm.allreduce_(buffer)
    assert comm.size >= 1
    if comm.size == 1:
        assert torch.equal(buffer, torch.arange(5, dtype=torch.float32))
        assert comm.allgather_object("x") == ["x"]


@pytest.mark.mpi(min_size=2)
def test_packed_allreduce_is_sum_of_rank_buffers_in_place() -> None:
    comm = Communicator()
    n = 1000
    packed = PackedBuffer(n, 2, dtype=torch.float32)
    pointer = packed.data.data_ptr()
    packed.vector.copy_(torch.arange(n, dtype=torch.float32) * (comm.rank + 1))
    packed.scalars[0] = float(comm.rank)
    packed.scalars[1] = 1.0
    comm.allreduce_(packed.data)
    ranks_sum = comm.size * (comm.size + 1) / 2
    assert packed.data.data_ptr() == pointer  # in place, no copy
    assert torch.equal(packed.vector, torch.arange(n, dtype=torch.float32) * ranks_sum)
    assert packed.scalars[0].item() == sum(range(comm.size))
    assert packed.scalars[1].item() == comm.size


@pytest.mark.mpi(min_size=2)
def test_counters_count_calls_and_bytes() -> None:
    comm = Communicator()
    calls, nbytes, _ = comm.stats.totals()
    comm.allreduce_(torch.ones(100, dtype=torch.float32))
    comm.allreduce_(torch.ones(10, dtype=torch.float64), op="max")
    comm.bcast_(torch.ones(7, dtype=torch.float32))
    assert comm.stats.calls == calls + 3
    assert comm.stats.bytes == nbytes + 400 + 80 + 28
    assert comm.stats.ops["allreduce"].calls == 2
    assert comm.stats.ops["bcast"].bytes == 28
    assert comm.stats.seconds >= 0


@pytest.mark.mpi(min_size=2)
def test_allgatherv_concatenates_blocks_of_different_sizes() -> None:
    comm = Communicator()
    counts = [r + 1 for r in range(comm.size)]
    local = torch.full((comm.rank + 1,), float(comm.rank))
    out = comm.allgatherv(local, counts)
    expected = torch.cat([torch.full((r + 1,), float(r)) for r in range(comm.size)])
    assert torch.equal(out, expected)


@pytest.mark.mpi(min_size=2)
def test_bcast_and_split() -> None:
    comm = Communicator()
    buffer = torch.full((4,), float(comm.rank))
    comm.bcast_(buffer, root=comm.size - 1)
    assert torch.equal(buffer, torch.full((4,), float(comm.size - 1)))
    half = comm.split(comm.rank % 2)
    total = half.allreduce_scalars([1.0])[0]
    assert total == len([r for r in range(comm.size) if r % 2 == comm.rank % 2])


@pytest.mark.mpi(min_size=2)
def test_agree_raises_one_ranks_error_on_every_rank() -> None:
    comm = Communicator()
    local = ConfigError("bad option on the last rank") if comm.rank == comm.size - 1 else None
    with pytest.raises(ConfigError, match="bad option on the last rank"):
        comm.agree(local)
    comm.agree(None)  # no error anywhere: returns
