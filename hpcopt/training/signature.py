"""Start-up check that every rank runs the same job.

Different model shapes, dtypes, data sizes, options or initial parameters on
different ranks (a stale file on one node, a rank-dependent default) would make the
first allreduce combine unrelated buffers — or deadlock when the buffer sizes
differ.  One ``allgather`` of a small signature per rank, before the first tensor
collective, turns that into the same clear error on every rank.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from hpcopt.comm import Communicator
from hpcopt.errors import ConfigError


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def run_signature(config_json: str, parameters: torch.Tensor, train_samples: int, val_samples: int) -> dict[str, Any]:
    """What must be identical on every rank: config hash, size, dtype, data sizes, parameter checksum."""
    values = parameters.detach().contiguous().cpu()
    return {
        "config_sha256": _digest(config_json.encode()),
        "num_parameters": values.numel(),
        "dtype": str(values.dtype),
        "train_samples": train_samples,
        "val_samples": val_samples,
        # Bytes, not a float sum: a single flipped bit must show.
        "parameters_sha256": _digest(values.view(torch.uint8).numpy().tobytes()),
    }


def check_same_on_every_rank(comm: Communicator, signature: dict[str, Any]) -> None:
    """Raise the same :class:`ConfigError` on every rank unless all signatures equal rank 0's."""
    signatures = comm.allgather_object(signature)
    reference = signatures[0]
    problems = []
    for rank, other in enumerate(signatures[1:], start=1):
        for key in sorted(set(reference) | set(other)):
            if reference.get(key) != other.get(key):
                problems.append(f"{key} is {reference.get(key)} on rank 0 but {other.get(key)} on rank {rank}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ConfigError(f"ranks disagree at start-up: {shown}")
