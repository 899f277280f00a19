"""Which device a rank computes on: one rank per GPU, chosen by local rank.

``--device auto|cpu|cuda`` (``TrainConfig.device``):

* ``cpu``: always the CPU.
* ``auto``: CUDA if ``torch.cuda.is_available()``, else the CPU.
* ``cuda``: CUDA, or a :class:`~hpcopt.errors.ConfigError` where torch sees no GPU
  (raised on every rank, before any collective: see :func:`check_request`).

On CUDA, rank ``r`` of a node uses GPU ``local_rank % device_count``.  The local
rank comes from the launcher's environment (:data:`LOCAL_RANK_VARIABLES`, first
set wins) or, if none is set, from a shared-memory split of the communicator
(``Communicator.split_shared``, a collective: every rank must call
:func:`select_device` at the same point).  Launchers set these variables for all
ranks of a job or for none, so the collective is entered by all or by none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from hpcopt.comm import Communicator
from hpcopt.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")

#: Environment variables holding a rank's index among the ranks of its node:
#: Slurm, Open MPI, PMI/PMIx launchers, MPICH's hydra.
LOCAL_RANK_VARIABLES = ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_LOCAL_RANK", "MPI_LOCALRANKID")


@dataclass(frozen=True)
class DeviceChoice:
    """Where this rank computes and why.

    Attributes:
        device: the torch device (``cpu`` or ``cuda:i``).
        local_rank: this rank's index on its node.
        source: where ``local_rank`` came from (a variable name or ``"shared-memory split"``).
        gpu_model: the GPU's name (``""`` on the CPU).
    """

    device: torch.device
    local_rank: int
    source: str
    gpu_model: str

    def describe(self, world_size: int) -> str:
        """One line for rank 0 to print."""
        if self.device.type == "cpu":
            return f"device: cpu on {world_size} rank(s)"
        return f"device: one GPU per rank, rank 0 on {self.device} ({self.gpu_model}); local rank from {self.source}"


def local_rank_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """``(local rank, variable)`` from the first of :data:`LOCAL_RANK_VARIABLES` set, else ``None``."""
    env = os.environ if environ is None else environ
    for name in LOCAL_RANK_VARIABLES:
        value = env.get(name, "").strip()
        if value:
            try:
                rank = int(value)
            except ValueError as exc:
                raise ConfigError(f"{name}={value!r} is not a local rank") from exc
            if rank < 0:
                raise ConfigError(f"{name}={value!r} is not a local rank")
            return rank, name
    return None


def local_rank(comm: Communicator, environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """This rank's index on its node and where it came from (may be a collective, see above)."""
    found = local_rank_from_env(environ)
    if found is not None:
        return found
    return comm.split_shared().rank, "shared-memory split"


def resolve_kind(requested: str, cuda_available: bool | None = None) -> str:
    """``"cpu"`` or ``"cuda"`` for ``--device requested``; local check, no collective.

    Raises:
        ConfigError: unknown name, or ``cuda`` where torch sees no GPU.
    """
    if requested not in DEVICE_CHOICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICE_CHOICES)}, got {requested!r}")
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "cuda" and not available:
        raise ConfigError(
            "--device cuda, but torch sees no GPU (torch.cuda.is_available() is False: "
            f"torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    if requested == "auto":
        return "cuda" if available else "cpu"
    return requested


def choose_device(kind: str, rank: int, source: str) -> DeviceChoice:
    """The device of a rank of local rank ``rank`` for a resolved ``kind``; binds nothing.

    Separate from :func:`select_device` so that ``hpcopt info`` can show the choice
    without binding the GPU or splitting the communicator a second time.
    """
    if kind == "cpu":
        return DeviceChoice(torch.device("cpu"), -1, "", "")
    index = rank % torch.cuda.device_count()
    return DeviceChoice(torch.device("cuda", index), rank, source, torch.cuda.get_device_name(index))


def select_device(requested: str, comm: Communicator, environ: Mapping[str, str] | None = None) -> DeviceChoice:
    """Resolve ``requested`` and, on CUDA, bind this rank to its GPU (``torch.cuda.set_device``)."""
    kind = resolve_kind(requested)
    if kind == "cpu":
        return choose_device(kind, -1, "")
    choice = choose_device(kind, *local_rank(comm, environ))
    torch.cuda.set_device(choice.device)
    return choice
