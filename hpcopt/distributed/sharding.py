"""Global mini-batches that depend only on the seed, sharded contiguously over ranks.

Epoch e draws one global permutation of the training set from ``(seed, e)``; global
batch b is rows ``[b·B, (b+1)·B)`` of it, and rank r takes the contiguous slice
``[r·B/P, (r+1)·B/P)`` of every global batch.  The sequence of global batches is
therefore the same at any rank count, which is what makes runs at 1, 2 and 4 ranks
comparable step for step.  A trailing partial batch is dropped so that every step
sees a batch of the same size.

Spatial sharding (``shard=spatial``, the thesis' PINN variant of APTS-D): with a
``sort_key`` (a spatial coordinate per sample), each global batch is ordered by it
before the ranks take their contiguous slices, so rank r owns the r-th interval of
that coordinate.  The global batch, and hence the global objective, is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from hpcopt.errors import ConfigError


class GlobalBatches:
    """This rank's share of every global mini-batch.

    Args:
        num_samples: size of the training set.
        batch_size: global mini-batch size B (must be divisible by ``world_size``).
        seed: the run's seed.
        rank: this rank.
        world_size: number of ranks P.
        sort_key: optional per-sample key (e.g. the x coordinate of a collocation
            point); each global batch is ordered by it before it is sliced.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        sort_key: torch.Tensor | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ConfigError(f"--batch-size must be positive, got {batch_size}")
        if world_size > num_samples:
            raise ConfigError(
                f"{world_size} ranks but only {num_samples} training samples: every rank needs at least one "
                "sample per batch; use fewer ranks or more data"
            )
        if batch_size > num_samples:
            raise ConfigError(f"--batch-size {batch_size} exceeds the {num_samples} training samples")
        if batch_size % world_size != 0:
            raise ConfigError(
                f"--batch-size {batch_size} is not divisible by the {world_size} ranks "
                f"(each rank takes an equal share; try {batch_size - batch_size % world_size or world_size})"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shard_size = batch_size // world_size
        if sort_key is not None and sort_key.shape != (num_samples,):
            raise ConfigError(f"sort_key needs one value per sample ({num_samples}), got shape {tuple(sort_key.shape)}")
        self.sort_key = None if sort_key is None else sort_key.detach().cpu()

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def epoch(self, epoch: int) -> Iterator[torch.Tensor]:
        """Indices of this rank's shard of each global batch of ``epoch``."""
        order = self.permutation(epoch)
        for batch in range(self.batches_per_epoch):
            rows = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            if self.sort_key is not None:
                # Stable, so equal keys keep the seed's order: the shards stay reproducible.
                rows = rows[torch.sort(self.sort_key[rows], stable=True).indices]
            start = self.rank * self.shard_size
            yield rows[start : start + self.shard_size]


def contiguous_slice(num_rows: int, rank: int, world_size: int) -> slice:
    """Rank r's contiguous part of ``num_rows`` rows (sizes differ by at most one)."""
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class ShardBatchSampler(torch.utils.data.Sampler[list[int]]):
    """This rank's shard of every global batch, as a batch sampler for a ``DataLoader``.

    The role ``DistributedSampler`` plays for DDP, with hpcopt's order: the global
    batches of epoch e are those of :class:`GlobalBatches` (a function of the seed
    and e only), and this rank yields its contiguous slice of each.  So
    ``DataLoader(dataset, batch_sampler=ShardBatchSampler(...))`` reads only this
    rank's rows, and the global batch sequence is the same at any rank count and the
    same as ``hpcopt train`` uses.  Call :meth:`set_epoch` before each epoch.

    Args:
        num_samples: ``len(dataset)``.
        batch_size: the global batch size B (divisible by ``world_size``).
        seed: the run's seed.
        rank: this rank (default 0).
        world_size: the number of ranks P (default 1).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.batches = GlobalBatches(num_samples, batch_size, seed, rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s permutation on the next iteration."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        for rows in self.batches.epoch(self.epoch):
            yield rows.tolist()

    def __len__(self) -> int:
        return self.batches.batches_per_epoch
