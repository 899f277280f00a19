"""Which rank owns which parameters: the explicit ownership object of APTS-P (docs/algorithms.md §2).

A :class:`ParameterDecomposition` cuts the flat parameter vector into *blocks* —
whole parameter tensors, or equal contiguous chunks of the flat vector — and gives
every rank a run of consecutive blocks, balanced by element count.  Ownership is
therefore one contiguous range ``[start, end)`` of the flat vector per rank, in rank
order, so gathering the owned pieces in rank order (``Allgatherv``) yields the full
vector directly, without a permutation *(ours)*.

It is computed from the parameter sizes alone, so every rank computes the same
assignment without communication; :meth:`ParameterDecomposition.validate` checks
that claim with one gathered signature before the first collective of training.

:func:`linear_partition` (consecutive groups minimising the largest group) is also
what cuts a model into pipeline stages (:mod:`hpcopt.distributed.pipeline`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from hpcopt.comm import Communicator
from hpcopt.errors import ConfigError

BLOCK_MODES = ("auto", "tensors", "chunks")


def linear_partition(weights: Sequence[int], parts: int) -> list[int]:
    """Cut points ``0 = c_0 < c_1 < … < c_parts = len(weights)`` of ``parts`` non-empty consecutive groups.

    Minimises the largest group sum exactly (dynamic programming, O(parts·len²)); among
    optimal cuts it takes the earliest, so the result is deterministic.

    Raises:
        ValueError: fewer weights than parts, or ``parts < 1``.
    """
    count = len(weights)
    if parts < 1 or count < parts:
        raise ValueError(f"cannot cut {count} items into {parts} non-empty groups")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + int(w))
    inf = float("inf")
    # best[p][i]: the smallest possible maximum when the first i items form p groups.
    best = [[inf] * (count + 1) for _ in range(parts + 1)]
    cut = [[0] * (count + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for p in range(1, parts + 1):
        for i in range(p, count - (parts - p) + 1):
            for j in range(p - 1, i):
                value = max(best[p - 1][j], prefix[i] - prefix[j])
                if value < best[p][i]:
                    best[p][i], cut[p][i] = value, j
    cuts = [count]
    for p in range(parts, 0, -1):
        cuts.append(cut[p][cuts[-1]])
    return cuts[::-1]


@dataclass(frozen=True)
class ParameterDecomposition:
    """Contiguous ownership of the flat parameter vector by the ranks of a communicator.

    Attributes:
        mode: ``tensors`` (blocks are whole parameter tensors) or ``chunks`` (blocks
            are equal contiguous chunks of the flat vector, one per rank).
        numel: length of the flat vector.
        world_size: number of ranks the assignment is for.
        blocks: ``(name, start, end)`` of every block in flat order.
        owners: the owning rank of each block (non-decreasing).
        ranges: ``(start, end)`` of the flat vector owned by each rank.
    """

    mode: str
    numel: int
    world_size: int
    blocks: tuple[tuple[str, int, int], ...]
    owners: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]

    @classmethod
    def build(
        cls,
        names: Sequence[str],
        sizes: Sequence[int],
        world_size: int,
        mode: str = "auto",
        max_imbalance: float = 1.25,
    ) -> ParameterDecomposition:
        """Assign the parameter tensors ``names``/``sizes`` (flat order) to ``world_size`` ranks.

        ``auto`` takes whole tensors when that is balanced within ``max_imbalance``
        (max/mean owned elements) and otherwise falls back to chunks — tensors are
        often few and unbalanced (a PINN's two hidden matrices hold 90% of it).

        Raises:
            ConfigError: unknown mode, or more ranks than blocks (the same on every rank,
                since it depends on the sizes only).
        """
        if mode not in BLOCK_MODES:
            raise ConfigError(f"apts-p: unknown blocks mode '{mode}' (choose from {', '.join(BLOCK_MODES)})")
        numel = sum(int(s) for s in sizes)
        if mode in ("tensors", "auto") and len(sizes) >= world_size:
            offsets = [0]
            for size in sizes:
                offsets.append(offsets[-1] + int(size))
            cuts = linear_partition(sizes, world_size)
            owners = tuple(rank for rank in range(world_size) for _ in range(cuts[rank + 1] - cuts[rank]))
            ranges = tuple((offsets[cuts[r]], offsets[cuts[r + 1]]) for r in range(world_size))
            blocks = tuple((name, offsets[i], offsets[i + 1]) for i, name in enumerate(names))
            candidate = cls("tensors", numel, world_size, blocks, owners, ranges)
            if mode == "tensors" or candidate.imbalance <= max_imbalance:
                return candidate
        elif mode == "tensors":
            raise ConfigError(
                f"apts-p: {world_size} ranks but only {len(sizes)} parameter tensors to own; use fewer ranks "
                "or --set blocks=chunks"
            )
        if numel < world_size:
            raise ConfigError(f"apts-p: {world_size} ranks but only {numel} parameters to own")
        base, extra = divmod(numel, world_size)
        bounds = [0]
        for rank in range(world_size):
            bounds.append(bounds[-1] + base + (1 if rank < extra else 0))
        ranges = tuple((bounds[r], bounds[r + 1]) for r in range(world_size))
        blocks = tuple((f"chunk{r}", start, end) for r, (start, end) in enumerate(ranges))
        return cls("chunks", numel, world_size, blocks, tuple(range(world_size)), ranges)

    @property
    def counts(self) -> list[int]:
        """Elements owned by each rank (the Allgatherv counts)."""
        return [end - start for start, end in self.ranges]

    @property
    def imbalance(self) -> float:
        """Largest owned element count over the mean (1.0 is perfect balance)."""
        counts = self.counts
        return max(counts) / (sum(counts) / len(counts))

    def owned(self, rank: int) -> slice:
        """The slice of the flat vector owned by ``rank``."""
        start, end = self.ranges[rank]
        return slice(start, end)

    def signature(self) -> str:
        """A short digest of the whole assignment, for the cross-rank check."""
        text = repr((self.mode, self.numel, self.world_size, self.blocks, self.owners, self.ranges))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def validate(self, comm: Communicator) -> None:
        """Check, with one gathered signature, that every rank computed this assignment.

        Every rank calls it at the same point and every rank raises the same
        :class:`ConfigError` when the assignments differ or the sizes disagree with
        the communicator, before any collective of training.
        """
        if self.world_size != comm.size:
            # Deterministic given the inputs, so every rank takes this branch alike.
            raise ConfigError(f"apts-p: decomposition built for {self.world_size} ranks, communicator has {comm.size}")
        signatures = comm.allgather_object(self.signature())
        differing = [rank for rank, sig in enumerate(signatures) if sig != signatures[0]]
        if differing:
            raise ConfigError(
                "apts-p: the parameter assignment differs across ranks (ranks "
                f"{', '.join(map(str, differing))} disagree with rank 0); the model definitions differ"
            )
