"""Device selection, CUDA-aware detection, host staging and ``--device``.

The staging path (device tensor → host buffer → MPI → back) is exercised on CPU
tensors by forcing it (``Communicator.force_staging``); under ``mpiexec`` it must
give exactly what the direct path gives.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpcopt.comm import Communicator, HostStaging, cuda_aware_mpi
from hpcopt.errors import ConfigError
from hpcopt.training.device import LOCAL_RANK_VARIABLES, local_rank, local_rank_from_env, resolve_kind, select_device
from tests.conftest import run_hpcopt

pytestmark = pytest.mark.timeout(120)

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: torch.cuda.is_available() is False")


# -- local rank and device kind ---------------------------------------------------------


@pytest.mark.parametrize("name", LOCAL_RANK_VARIABLES)
def test_local_rank_from_each_launcher_variable(name: str) -> None:
    assert local_rank_from_env({name: "3", "UNRELATED": "9"}) == (3, name)


def test_local_rank_variables_in_order_of_precedence() -> None:
    env = {"MPI_LOCALRANKID": "2", "SLURM_LOCALID": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "5"}
    assert local_rank_from_env(env) == (1, "SLURM_LOCALID")
    assert local_rank_from_env({}) is None
    assert local_rank_from_env({"SLURM_LOCALID": " "}) is None


@pytest.mark.parametrize("value", ["x", "-1", "1.5"])
def test_bad_local_rank_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="SLURM_LOCALID"):
        local_rank_from_env({"SLURM_LOCALID": value})


def test_device_kind_resolution() -> None:
    assert resolve_kind("cpu", cuda_available=True) == "cpu"
    assert resolve_kind("auto", cuda_available=False) == "cpu"
    assert resolve_kind("auto", cuda_available=True) == "cuda"
    assert resolve_kind("cuda", cuda_available=True) == "cuda"
    with pytest.raises(ConfigError, match="torch sees no GPU"):
        resolve_kind("cuda", cuda_available=False)
    with pytest.raises(ConfigError, match="--device must be one of"):
        resolve_kind("gpu")


@pytest.mark.mpi(min_size=1)
def test_local_rank_from_shared_memory_split() -> None:
    comm = Communicator()
    rank, source = local_rank(comm, environ={})
    assert source == "shared-memory split"
    hosts = comm.hostnames()
    # Ranks on this rank's host, in world order: the split orders by world rank.
    assert rank == [r for r, host in enumerate(hosts) if host == hosts[comm.rank]].index(comm.rank)
    assert local_rank(comm, environ={"PMI_LOCAL_RANK": "7"}) == (7, "PMI_LOCAL_RANK")


@pytest.mark.mpi(min_size=1)
def test_select_cpu_device_needs_no_collective() -> None:
    choice = select_device("cpu", Communicator())
    assert choice.device == torch.device("cpu") and choice.gpu_model == ""
    assert "cpu" in choice.describe(1)


# -- CUDA-aware detection ------------------------------------------------------------------


def test_cuda_aware_override_and_query() -> None:
    assert cuda_aware_mpi({"HPCOPT_CUDA_AWARE": "1"}) is True
    assert cuda_aware_mpi({"HPCOPT_CUDA_AWARE": "0"}) is False
    with pytest.raises(ConfigError, match="HPCOPT_CUDA_AWARE"):
        cuda_aware_mpi({"HPCOPT_CUDA_AWARE": "yes"})
    assert isinstance(cuda_aware_mpi({}), bool)  # the library's own answer


# -- host staging ---------------------------------------------------------------------------


def test_host_staging_round_trip_and_buffer_reuse() -> None:
    staging = HostStaging()
    tensor = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    host = staging.to_host(tensor)
    assert host.shape == (10,) and torch.equal(host, tensor.reshape(-1))
    assert staging.pinned in (True, False)  # pinned where the torch build can pin memory
    host.mul_(2)
    staging.to_device(host, tensor)
    assert torch.equal(tensor, 2 * torch.arange(10, dtype=torch.float32).reshape(2, 5))
    assert staging.to_host(tensor) is host  # one buffer per (slot, dtype, size), reused
    assert staging.copies == 3 and staging.bytes == 3 * 40


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", ["sum", "max"])
def test_staged_allreduce_equals_direct_allreduce(dtype: torch.dtype, op: str) -> None:
    comm = Communicator()
    generator = torch.Generator().manual_seed(11 + comm.rank)
    data = torch.randn(1001, generator=generator, dtype=torch.float64).to(dtype)
    direct = data.clone()
    comm.allreduce_(direct, op)
    staged = data.clone()
    pointer = staged.data_ptr()
    comm.force_staging = True
    comm.allreduce_(staged, op)
    comm.force_staging = False
    assert torch.equal(staged, direct)
    assert staged.data_ptr() == pointer  # still in place for the caller
    assert comm.staging.copies == (2 if comm.size > 1 else 0)  # no MPI, no staging, in a world of one


@pytest.mark.mpi(min_size=1)
def test_staged_bcast_and_allgatherv_equal_direct() -> None:
    comm = Communicator()
    root = comm.size - 1
    counts = [r + 2 for r in range(comm.size)]
    local = torch.arange(comm.rank + 2, dtype=torch.float64) + 10 * comm.rank
    direct_b = torch.full((6,), float(comm.rank))
    comm.bcast_(direct_b, root=root)
    direct_g = comm.allgatherv(local, counts)
    comm.force_staging = True
    staged_b = torch.full((6,), float(comm.rank))
    comm.bcast_(staged_b, root=root)
    staged_g = comm.allgatherv(local, counts)
    comm.force_staging = False
    assert torch.equal(staged_b, direct_b) and torch.equal(staged_b, torch.full((6,), float(root)))
    assert torch.equal(staged_g, direct_g)


@needs_gpu
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_allreduce_of_gpu_tensors_equals_the_cpu_allreduce(dtype: torch.dtype) -> None:
    """Device buffers through the path the communicator picks: host staging, or MPI directly if CUDA-aware."""
    comm = Communicator()
    generator = torch.Generator().manual_seed(31 + comm.rank)
    data = torch.randn(100_003, generator=generator, dtype=torch.float64).to(dtype)
    on_cpu = data.clone()
    comm.allreduce_(on_cpu)
    on_gpu = data.to(torch.device("cuda", torch.cuda.current_device()))
    pointer, copies = on_gpu.data_ptr(), comm.staging.copies
    comm.allreduce_(on_gpu)
    assert on_gpu.data_ptr() == pointer  # in place for the caller
    assert comm.staging.copies == copies + (0 if comm.cuda_aware else 2)
    if comm.cuda_aware:  # the library may reduce on the device, in another order
        torch.testing.assert_close(on_gpu.cpu(), on_cpu)
    else:
        assert torch.equal(on_gpu.cpu(), on_cpu)


# -- --device on the command line -------------------------------------------------------------


@no_gpu
def test_device_cuda_without_gpu_is_a_clean_error_on_every_rank() -> None:
    done = run_hpcopt(["train", "--problem", "quadratic", "--optimizer", "sgd", "--device", "cuda"], ranks=2)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("hpcopt: error:")]
    assert len(lines) == 2 and all("--device cuda, but torch sees no GPU" in line for line in lines)
    assert "Traceback" not in done.stderr


def test_run_log_records_the_device(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    out = tmp_path / "run.h5"
    args = ["train", "--problem", "quadratic", "--optimizer", "sgd", "--device", "cpu", "--quiet"]
    done = run_hpcopt([*args, "--epochs", "1", "--max-steps", "1", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    with h5py.File(out, "r") as f:
        assert f.attrs["device"] == "cpu"
        assert f.attrs["gpu_model"] == ""
        assert not bool(f.attrs["cuda_aware_mpi"])
        assert f.attrs["kernels"] == "torch"  # CPU parameters: the plain torch vector updates


@needs_gpu
@pytest.mark.parametrize("optimizer", ["apts-d", "hf"])
def test_two_rank_gpu_run_equals_cpu_run(tmp_path: Path, optimizer: str) -> None:
    h5py = pytest.importorskip("h5py")
    losses = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.h5"
        args = ["train", "--problem", "poisson2d", "--optimizer", optimizer, "--device", device, "--quiet"]
        if optimizer == "apts-d":
            # In Adam's metric (the default) the fused kernels' float64 reductions alone move a
            # step by 1e-3 (tests/kernels/test_kernel_wiring.py); the Euclidean norm compares
            # the devices, not the reduction precision.
            args += ["--set", "metric=euclidean"]
        done = run_hpcopt([*args, "--epochs", "3", "--out", str(out)], ranks=2, timeout=300)
        assert done.returncode == 0, done.stderr
        with h5py.File(out, "r") as f:
            losses[device] = f["iterations/loss"][:]
            if device == "cuda":
                assert f.attrs["device"].startswith("cuda") and f.attrs["gpu_model"]
    assert losses["cpu"].shape == losses["cuda"].shape
    # Same maths, different reduction orders on the two devices: float32 agreement, not bits.
    torch.testing.assert_close(torch.from_numpy(losses["cuda"]), torch.from_numpy(losses["cpu"]), rtol=1e-4, atol=1e-6)
