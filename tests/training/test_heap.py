"""``--heap``: glibc keeps a freed large buffer for the next allocation (``keep``) or unmaps it (``release``)."""

from __future__ import annotations

import resource

import pytest
import torch

from hpcopt.config import build_config
from hpcopt.errors import ConfigError
from hpcopt.training.config import TrainConfig
from hpcopt.training.heap import _glibc, set_heap

glibc_only = pytest.mark.skipif(_glibc() is None, reason="the C library is not glibc: --heap changes nothing")

# Above glibc's largest mmap threshold (32 MiB), so that with its defaults every
# allocation of this size is a fresh mapping whose pages fault in when first written.
ROWS = 64 * 2**20 // 4


def _faults_of_one_buffer() -> int:
    """Minor page faults of allocating, writing and freeing one 64 MiB buffer."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = torch.empty(ROWS, dtype=torch.float32)
    buffer.fill_(1.0)
    del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc_only
def test_keep_reuses_the_pages_of_a_freed_large_buffer() -> None:
    pages = ROWS * 4 // resource.getpagesize()
    try:
        assert set_heap("release")
        assert _faults_of_one_buffer() >= 0.9 * pages  # warm-up
        assert _faults_of_one_buffer() >= 0.9 * pages  # mapped afresh: every page faults again
        assert set_heap("keep")
        _faults_of_one_buffer()  # the first one comes from the heap and grows it
        assert _faults_of_one_buffer() <= 0.05 * pages  # the second reuses those pages
    finally:
        set_heap("keep")  # what every training run sets


def test_bad_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="heap mode must be one of keep, release"):
        set_heap("never")
    with pytest.raises(ConfigError, match="--heap must be one of keep, release, got 'never'"):
        build_config(TrainConfig, {"heap": "never"}, what="train")
