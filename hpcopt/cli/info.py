"""``hpcopt info``: what an HPC user needs to debug a set-up, from every rank, in one report.

Every rank collects its own facts (:class:`RankInfo`: host, local rank, the device
``train`` would put it on, its launcher variables, whether the CUDA kernels compile
there); rank 0 adds what is the same everywhere (:class:`Report`: versions, MPI
vendor and CUDA support, CuPy, nvcc, the data directories), gathers the ranks'
records through the communicator and renders them as an aligned text report or,
with ``--json``, as JSON.  Other ranks print nothing.

May import :mod:`hpcopt.comm` (every MPI query), :mod:`hpcopt.training.device`
(the device choice of ``train``, reused rather than repeated),
:mod:`hpcopt.kernels`, :mod:`hpcopt.problems.mnist` (to look for data as the
loader does) and :mod:`hpcopt.analysis.tables` (the table layout of ``analyze``).
CuPy is imported only here and only when asked for, as everywhere in hpcopt.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import hpcopt
from hpcopt.comm import Communicator, cuda_aware_mpi, mpi4py_version, mpi_standard, mpi_vendor
from hpcopt.errors import ConfigError, DataError
from hpcopt.training.device import LOCAL_RANK_VARIABLES, choose_device, local_rank, resolve_kind

#: Launcher variables that say where a rank sits (besides every ``SLURM_*``): Open MPI,
#: PMI/PMIx, MPICH's hydra, Cray PALS; the local-rank ones ``train`` reads come first.
LAUNCHER_VARIABLES = (
    *LOCAL_RANK_VARIABLES,
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "OMPI_COMM_WORLD_NODE_RANK",
    "PMI_RANK",
    "PMI_SIZE",
    "PMIX_RANK",
    "MPI_LOCALNRANKS",
    "PALS_RANKID",
    "PALS_LOCAL_RANKID",
)

#: Settings that change what a rank does: GPU visibility, thread pools, hpcopt's own.
SETTING_VARIABLES = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")

#: The ``SLURM_*`` variables the text report shows (a job sets dozens; ``--json`` has all).
SLURM_SHOWN = (
    "SLURM_JOB_ID",
    "SLURM_JOB_NAME",
    "SLURM_CLUSTER_NAME",
    "SLURM_JOB_PARTITION",
    "SLURM_JOB_NODELIST",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE",
    "SLURM_CPUS_PER_TASK",
    "SLURM_CPUS_ON_NODE",
    "SLURM_STEP_ID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_GPUS_ON_NODE",
    "SLURM_JOB_GPUS",
    "SLURM_STEP_GPUS",
    "SLURM_MPI_TYPE",
    "SLURM_CPU_BIND",
)

#: The dataset folders the tests, benchmarks and docs use (``../shared/datasets/<name>``).
DATASETS = ("mnist", "mnist-full", "tinyshakespeare")

#: Per-rank values of a variable shown before the rest is elided.
_VALUES_SHOWN = 8


@dataclass
class RankInfo:
    """What one rank sees.

    Attributes:
        rank, host, pid: where it runs (``host``: ``MPI_Get_processor_name``).
        cpus: cores it may run on (its CPU affinity: shows how the launcher bound it).
        local_rank, local_rank_source: its index on its node and the variable it came
            from (or ``"shared-memory split"``), as ``train`` determines them.
        gpus: GPUs torch sees on this rank.
        device, gpu_model: where ``train --device auto`` would compute.
        kernels: the CUDA kernels on that device: ``ok``, ``no GPU``, ``no CuPy`` or
            ``failed: …``.
        environment: the ``SLURM_*``, launcher, CUDA, thread and ``HPCOPT_*`` variables set.
    """

    rank: int
    host: str
    pid: int
    cpus: int
    local_rank: int
    local_rank_source: str
    gpus: int
    device: str
    gpu_model: str
    kernels: str
    environment: dict[str, str] = field(default_factory=dict)


@dataclass
class DataDir:
    """A candidate data directory and the datasets found in it.

    Attributes:
        path: the directory; source: why it is a candidate; exists: whether it is a directory.
        datasets: for each of :data:`DATASETS`, what the loader would find (``missing``
            when the folder is absent).
    """

    path: str
    source: str
    exists: bool
    datasets: dict[str, str] = field(default_factory=dict)


@dataclass
class Report:
    """The whole report (rank 0's view plus every rank's :class:`RankInfo`)."""

    hpcopt: str
    python: str
    python_executable: str
    torch: str
    torch_cuda: str | None
    mpi4py: str
    mpi_library: str
    mpi_vendor: str
    mpi_standard: str
    cuda_aware: bool | None
    cuda_aware_source: str
    cupy: str
    nvcc: str | None
    size: int
    ranks: list[RankInfo]
    data: list[DataDir]


# -- what each rank collects ---------------------------------------------------------


def launcher_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables of ``environ`` (default ``os.environ``) that say how this rank was launched."""
    env = os.environ if environ is None else environ
    names = {*LAUNCHER_VARIABLES, *SETTING_VARIABLES}
    return {
        name: value for name, value in sorted(env.items()) if name in names or name.startswith(("SLURM_", "HPCOPT_"))
    }


def kernel_status(device: torch.device) -> str:
    """Whether the CUDA kernels compile and agree with their CPU twins on ``device``.

    Only a GPU can answer; on the CPU the answer is ``"no GPU"``.  Each kernel file
    is exercised once (compiling it with NVRTC on first use) on a small vector.
    """
    if device.type != "cuda":
        return "no GPU"
    from hpcopt.kernels import CpuKernels, CudaKernels

    try:
        from hpcopt.kernels.cuda import import_cupy

        import_cupy()
    except ConfigError:
        return "no CuPy"
    try:
        cuda, twin = CudaKernels(device), CpuKernels()
        n = 1000
        generator = torch.Generator().manual_seed(0)
        host = [torch.randn(n, generator=generator, dtype=torch.float64) for _ in range(4)]
        gpu = [vector.to(device) for vector in host]
        # One call per kernel file: updates.cu (with reduce.cu's partial sums), cg.cu, pack.cu.
        checks = [
            (cuda.sq_distance(gpu[0], gpu[1]), twin.sq_distance(host[0], host[1])),
            (
                cuda.cg_step_(gpu[0], gpu[1], gpu[2], gpu[3], 0.5),
                twin.cg_step_(host[0], host[1], host[2], host[3], 0.5),
            ),
        ]
        scalars = torch.ones(2, dtype=torch.float64)
        packed = cuda.pack(torch.empty(n + 2, dtype=torch.float64, device=device), gpu[0], scalars.to(device), 2.0)
        reference = twin.pack(torch.empty(n + 2, dtype=torch.float64), host[0], scalars, 2.0)
    except Exception as exc:  # NVRTC, driver and CuPy errors come as CuPy's own exception types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"failed: {type(exc).__name__}: {first_line}"
    agree = all(abs(got - want) <= 1e-9 * max(1.0, abs(want)) for got, want in checks)
    if not agree or not torch.allclose(packed.cpu(), reference):
        return "failed: results differ from the CPU twins"
    return "ok"


def collect_rank(comm: Communicator, environ: Mapping[str, str] | None = None) -> RankInfo:
    """This rank's :class:`RankInfo` without the host (a collective when no local-rank variable is set)."""
    rank, source = local_rank(comm, environ)
    choice = choose_device(resolve_kind("auto"), rank, source)
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only; elsewhere the machine's count
    cpus = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    return RankInfo(
        rank=comm.rank,
        host="",
        pid=os.getpid(),
        cpus=cpus,
        local_rank=rank,
        local_rank_source=source,
        gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        device=str(choice.device),
        gpu_model=choice.gpu_model,
        kernels=kernel_status(choice.device),
        environment=launcher_environment(environ),
    )


# -- what rank 0 adds ------------------------------------------------------------------


def cupy_version() -> str:
    """CuPy's version, ``"not installed"``, or why importing it failed."""
    try:
        import cupy
    except ImportError:
        return "not installed"
    except Exception as exc:  # a CuPy built for another CUDA fails at import with its own errors
        return f"broken: {type(exc).__name__}: {exc}"
    return str(cupy.__version__)


def cuda_support(environ: Mapping[str, str] | None = None) -> tuple[bool | None, str]:
    """Whether MPI gets device memory directly, and who said so (``None``: a bad override)."""
    env = os.environ if environ is None else environ
    try:
        aware = cuda_aware_mpi(env)
    except ConfigError as exc:
        return None, str(exc)
    override = env.get("HPCOPT_CUDA_AWARE", "").strip()
    return aware, f"HPCOPT_CUDA_AWARE={override}" if override else "reported by the MPI library"


def data_candidates(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> list[tuple[Path, str]]:
    """Directories that may hold the datasets, each with why it is a candidate.

    ``$HPCOPT_DATA_DIR`` (the loaders' default), ``../shared/datasets`` beside the
    source tree (where the tests look) and ``../shared/datasets`` from the working
    directory (the docs' ``--data-dir ../shared/datasets/mnist``), without repeats.
    """
    env = os.environ if environ is None else environ
    here = Path.cwd() if cwd is None else cwd
    candidates: list[tuple[Path, str]] = []
    if env.get("HPCOPT_DATA_DIR"):
        candidates.append((Path(env["HPCOPT_DATA_DIR"]).expanduser(), "HPCOPT_DATA_DIR"))
    source_tree = Path(hpcopt.__file__).resolve().parents[1]
    candidates.append((source_tree.parent / "shared" / "datasets", "beside the source tree"))
    candidates.append((here.parent / "shared" / "datasets", "../shared/datasets from the working directory"))
    unique: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for path, source in candidates:
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append((resolved, source))
    return unique


def dataset_status(folder: Path, name: str) -> str:
    """What the loader of ``name`` would find in ``folder``: ``missing``, ``ok (…)`` or the loader's complaint."""
    if not folder.is_dir():
        return "missing"
    if name == "tinyshakespeare":
        text = folder / "input.txt"
        return f"ok ({text.stat().st_size} bytes)" if text.is_file() else "no input.txt"
    from hpcopt.problems.mnist.problem import find_mnist_dir

    try:
        found = find_mnist_dir(folder)
    except DataError as exc:
        return str(exc).split(": ", 1)[-1]
    # With the train pair the loader uses the standard 60000/10000 split, else the t10k set only.
    has_train = any((found / f"train-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz"))
    return "ok (train + t10k)" if has_train else "ok (t10k only)"


def find_data(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> list[DataDir]:
    """Every :func:`data_candidates` directory with the :data:`DATASETS` in it.

    A directory that itself holds the MNIST files (``HPCOPT_DATA_DIR=…/mnist``, which
    the loader accepts) also gets an entry ``"."``.
    """
    found = []
    for path, source in data_candidates(environ, cwd):
        data = DataDir(path=str(path), source=source, exists=path.is_dir())
        if data.exists:
            if any((path / f"t10k-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz")):
                data.datasets["."] = dataset_status(path, "mnist")
            data.datasets.update({name: dataset_status(path / name, name) for name in DATASETS})
        found.append(data)
    return found


def collect(comm: Communicator) -> Report | None:
    """The report on rank 0, ``None`` elsewhere (a collective: every rank calls it)."""
    mine = collect_rank(comm)
    hosts = comm.hostnames()
    ranks: list[RankInfo] = comm.allgather_object(mine)
    if not comm.is_root:
        return None
    for info, host in zip(ranks, hosts):
        info.host = host
    aware, aware_source = cuda_support()
    return Report(
        hpcopt=hpcopt.__version__,
        python=platform.python_version(),
        python_executable=sys.executable,
        torch=str(torch.__version__),
        torch_cuda=torch.version.cuda,
        mpi4py=mpi4py_version(),
        mpi_library=comm.library_version(),
        mpi_vendor=mpi_vendor(),
        mpi_standard=mpi_standard(),
        cuda_aware=aware,
        cuda_aware_source=aware_source,
        cupy=cupy_version(),
        nvcc=shutil.which("nvcc"),
        size=comm.size,
        ranks=ranks,
        data=find_data(),
    )


# -- rendering -------------------------------------------------------------------------


def to_json(report: Report) -> str:
    return json.dumps(dataclasses.asdict(report), indent=2)


def _aligned(pairs: Sequence[tuple[str, str]], indent: str = "  ") -> list[str]:
    width = max((len(key) for key, _ in pairs), default=0)
    return [f"{indent}{key.ljust(width)}  {value}".rstrip() for key, value in pairs]


def _per_rank(values: Sequence[str | None]) -> str:
    """One value when every rank agrees, else the ranks' values in order (``-``: unset)."""
    if len(set(values)) == 1:
        return values[0] if values[0] is not None else "-"
    shown = ", ".join(value if value is not None else "-" for value in values[:_VALUES_SHOWN])
    more = f", … ({len(values)} ranks)" if len(values) > _VALUES_SHOWN else ""
    return f"{shown}{more}  (per rank)"


def _variables(ranks: Sequence[RankInfo]) -> list[str]:
    seen = sorted({name for info in ranks for name in info.environment})
    shown = [name for name in seen if not name.startswith("SLURM_") or name in SLURM_SHOWN]
    lines = _aligned([(name, _per_rank([info.environment.get(name) for info in ranks])) for name in shown])
    hidden = len(seen) - len(shown)
    if hidden:
        lines.append(f"  and {hidden} more SLURM_* variable(s): see --json")
    return lines or [
        "  none of SLURM_*, the launcher's rank variables, CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS, HPCOPT_*"
    ]


def to_text(report: Report) -> str:
    from hpcopt.analysis.tables import format_table

    if report.cuda_aware is None:
        aware = f"unknown: {report.cuda_aware_source}"
    else:
        aware = f"{'yes' if report.cuda_aware else 'no'} ({report.cuda_aware_source})"
    versions = [
        ("hpcopt", report.hpcopt),
        ("Python", f"{report.python} ({report.python_executable})"),
        ("torch", f"{report.torch} (CUDA {report.torch_cuda or 'none: a CPU build'})"),
        ("mpi4py", report.mpi4py),
        ("MPI library", " ".join(report.mpi_library.split())),  # MPICH pads its version with spaces
        ("MPI vendor", f"{report.mpi_vendor}, MPI standard {report.mpi_standard}"),
        ("MPI CUDA-aware", aware),
        ("CuPy", report.cupy),
        ("nvcc", report.nvcc or "not on PATH"),
    ]
    hosts = sorted({info.host for info in report.ranks})
    rows = [
        {
            "rank": info.rank,
            "host": info.host,
            "local rank": info.local_rank,
            "from": info.local_rank_source,
            "pid": info.pid,
            "cpus": info.cpus,
            "gpus": info.gpus,
            "device": info.device if not info.gpu_model else f"{info.device} ({info.gpu_model})",
            "kernels": info.kernels,
        }
        for info in report.ranks
    ]
    lines = ["hpcopt info", *_aligned(versions), ""]
    lines.append(f"{report.size} rank(s) on {len(hosts)} host(s): {', '.join(hosts)}")
    lines.extend("  " + line for line in format_table(rows).rstrip("\n").splitlines())
    lines += ["", "launcher and settings variables", *_variables(report.ranks), "", "data directories"]
    for data in report.data:
        lines.append(f"  {data.path}  ({data.source})")
        if not data.exists:
            lines.append("    not found")
        lines.extend(_aligned(list(data.datasets.items()), indent="    "))
    if not any(data.source == "HPCOPT_DATA_DIR" for data in report.data):
        lines.append("  HPCOPT_DATA_DIR is not set (train --data-dir DIR, or export HPCOPT_DATA_DIR)")
    return "\n".join(lines)


def run_info(as_json: bool, comm: Communicator | None = None) -> str:
    """Rank 0's report (``--json``: as JSON); ``""`` on the other ranks."""
    report = collect(Communicator() if comm is None else comm)
    if report is None:
        return ""
    return to_json(report) if as_json else to_text(report)
