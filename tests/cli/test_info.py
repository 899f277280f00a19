"""``hpcopt info`` and ``hpcopt --version``.

In-process ``mpi`` tests through :func:`hpcopt.cli.main` (1 rank under ``pytest
--with-mpi``, 2 under ``mpiexec``): rank 0 prints the one report and checks it
against what the test itself sees, the other ranks print nothing.  A subprocess
runs the command as a user would at 2 ranks; the data-directory search and the
text layout are checked on reports made here, without MPI.
"""

from __future__ import annotations

import gzip
import json
import platform
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

import hpcopt
from hpcopt import cli
from hpcopt.cli.info import (
    DataDir,
    RankInfo,
    Report,
    cuda_support,
    find_data,
    kernel_status,
    launcher_environment,
    to_text,
)
from hpcopt.training.device import LOCAL_RANK_VARIABLES
from tests.conftest import run_hpcopt
from tests.kernels.gpu_support import needs_gpu

pytestmark = pytest.mark.timeout(120)

LOCAL_RANK_SOURCES = (*LOCAL_RANK_VARIABLES, "shared-memory split")


def _check_versions(report: dict[str, object]) -> None:
    assert report["hpcopt"] == hpcopt.__version__
    assert report["python"] == platform.python_version()
    assert report["torch"] == torch.__version__
    assert report["torch_cuda"] == torch.version.cuda
    assert report["mpi4py"] == version("mpi4py")
    # The vendor's own version (major.minor) is part of the library's banner (MPICH, Open MPI, Intel MPI).
    vendor_version = str(report["mpi_vendor"]).rsplit(" ", 1)[-1]
    assert ".".join(vendor_version.split(".")[:2]) in str(report["mpi_library"])
    assert report["cuda_aware"] in (True, False)


@pytest.mark.mpi(min_size=1)
def test_info_json_in_process(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from hpcopt.comm import Communicator

    comm = Communicator()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", str(comm.size))
    hosts = comm.hostnames()
    assert cli.main(["info", "--json"]) == 0
    out = capsys.readouterr().out
    if not comm.is_root:
        assert out == ""
        return
    report = json.loads(out)
    _check_versions(report)
    assert report["mpi_library"] == comm.library_version()
    assert report["size"] == comm.size
    ranks = report["ranks"]
    assert [row["rank"] for row in ranks] == list(range(comm.size))
    assert [row["host"] for row in ranks] == hosts
    for row in ranks:
        assert row["environment"]["SLURM_JOB_ID"] == "4242"
        assert row["environment"]["SLURM_NTASKS"] == str(comm.size)
        assert row["local_rank_source"] in LOCAL_RANK_SOURCES
        if not torch.cuda.is_available():
            assert (row["device"], row["gpus"], row["kernels"]) == ("cpu", 0, "no GPU")
    # mpiexec here starts every rank on this one node: local ranks are the world ranks.
    if len(set(hosts)) == 1:
        assert [row["local_rank"] for row in ranks] == list(range(comm.size))


@pytest.mark.mpi(min_size=1)
def test_info_text_in_process(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from hpcopt.comm import Communicator

    comm = Communicator()
    monkeypatch.setenv("SLURM_JOB_NAME", "info-check")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    if not comm.is_root:
        assert out == ""
        return
    lines = out.splitlines()
    assert lines[0] == "hpcopt info"
    assert any(line.split()[:2] == ["torch", torch.__version__] for line in lines)
    header = next(index for index, line in enumerate(lines) if line.split()[:2] == ["rank", "host"])
    rows = lines[header + 2 : header + 2 + comm.size]
    assert [int(row.split()[0]) for row in rows] == list(range(comm.size))
    assert any(line.split() == ["SLURM_JOB_NAME", "info-check"] for line in lines)


def test_info_at_two_ranks_prints_one_report(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_JOB_NAME", "two-ranks")
    result = run_hpcopt(["info", "--json"], ranks=2)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count('"hpcopt":') == 1, result.stdout  # rank 0 only
    report = json.loads(result.stdout)
    _check_versions(report)
    assert report["size"] == 2
    assert [row["rank"] for row in report["ranks"]] == [0, 1]
    assert [row["local_rank"] for row in report["ranks"]] == [0, 1]
    for row in report["ranks"]:
        assert row["environment"]["SLURM_JOB_ID"] == "777"
        assert row["environment"]["SLURM_JOB_NAME"] == "two-ranks"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"hpcopt {hpcopt.__version__}\n"
    result = run_hpcopt(["--version"])
    assert (result.returncode, result.stdout) == (0, f"hpcopt {hpcopt.__version__}\n")


# -- the pieces, without MPI -----------------------------------------------------------


def test_launcher_environment_keeps_launch_variables_only() -> None:
    env = {
        "SLURM_JOB_ID": "1",
        "SLURM_PROCID": "3",
        "PMI_RANK": "3",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "CUDA_VISIBLE_DEVICES": "0,1",
        "HPCOPT_CUDA_AWARE": "0",
        "PATH": "/usr/bin",
        "PMI_FD": "9",
        "HOME": "/home/u",
    }
    assert launcher_environment(env) == {
        name: env[name]
        for name in (
            "CUDA_VISIBLE_DEVICES",
            "HPCOPT_CUDA_AWARE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "PMI_RANK",
            "SLURM_JOB_ID",
            "SLURM_PROCID",
        )
    }


def test_cuda_support_override_and_bad_value() -> None:
    assert cuda_support({"HPCOPT_CUDA_AWARE": "1"}) == (True, "HPCOPT_CUDA_AWARE=1")
    assert cuda_support({"HPCOPT_CUDA_AWARE": "0"}) == (False, "HPCOPT_CUDA_AWARE=0")
    aware, why = cuda_support({"HPCOPT_CUDA_AWARE": "yes"})
    assert aware is None and "HPCOPT_CUDA_AWARE must be 0 or 1" in why


def test_kernel_status_without_a_gpu() -> None:
    assert kernel_status(torch.device("cpu")) == "no GPU"


@needs_gpu
def test_kernels_compile_on_the_gpu() -> None:
    assert kernel_status(torch.device("cuda", 0)) == "ok"


def _touch_gz(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as handle:
        handle.write(b"")


def test_find_data_reports_each_dataset(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _touch_gz(data / "mnist" / "t10k-images-idx3-ubyte.gz")
    _touch_gz(data / "mnist" / "t10k-labels-idx1-ubyte.gz")
    (data / "mnist-full").mkdir()
    (data / "tinyshakespeare").mkdir()
    (data / "tinyshakespeare" / "input.txt").write_text("To be")
    shared = tmp_path / "shared" / "datasets"
    for name in ("t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz"):
        _touch_gz(shared / "mnist-full" / name)
    found = find_data({"HPCOPT_DATA_DIR": str(data)}, cwd=tmp_path / "project")
    by_source = {entry.source: entry for entry in found}
    first = found[0]
    assert (first.source, first.path, first.exists) == ("HPCOPT_DATA_DIR", str(data.resolve()), True)
    assert first.datasets["mnist"] == "ok (t10k only)"
    assert "no t10k-images-idx3-ubyte[.gz]" in first.datasets["mnist-full"]
    assert first.datasets["tinyshakespeare"] == "ok (5 bytes)"
    from_cwd = by_source["../shared/datasets from the working directory"]
    assert from_cwd.path == str(shared.resolve())
    assert from_cwd.datasets == {"mnist": "missing", "mnist-full": "ok (train + t10k)", "tinyshakespeare": "missing"}


def test_find_data_accepts_the_mnist_folder_itself(tmp_path: Path) -> None:
    _touch_gz(tmp_path / "t10k-images-idx3-ubyte.gz")
    found = find_data({"HPCOPT_DATA_DIR": str(tmp_path)}, cwd=tmp_path)
    assert found[0].datasets["."] == "ok (t10k only)"
    missing = find_data({"HPCOPT_DATA_DIR": str(tmp_path / "absent")}, cwd=tmp_path)
    assert (missing[0].exists, missing[0].datasets) == (False, {})


def _report(ranks: list[RankInfo]) -> Report:
    return Report(
        hpcopt="0.1.0",
        python="3.11.7",
        python_executable="/venv/bin/python",
        torch="2.13.0",
        torch_cuda="12.4",
        mpi4py="4.1.2",
        mpi_library="Open MPI v5.0.3, package: Open MPI",
        mpi_vendor="Open MPI 5.0.3",
        mpi_standard="3.1",
        cuda_aware=True,
        cuda_aware_source="reported by the MPI library",
        cupy="13.3.0",
        nvcc=None,
        size=len(ranks),
        ranks=ranks,
        data=[DataDir("/data", "HPCOPT_DATA_DIR", True, {"mnist": "ok (t10k only)", "mnist-full": "missing"})],
    )


def test_text_report_aligns_rows_and_folds_variables() -> None:
    ranks = [
        RankInfo(
            rank=rank,
            host=f"gpu{rank // 2:03d}",
            pid=1000 + rank,
            cpus=8,
            local_rank=rank % 2,
            local_rank_source="SLURM_LOCALID",
            gpus=2,
            device=f"cuda:{rank % 2}",
            gpu_model="NVIDIA H100",
            kernels="ok",
            environment={
                "SLURM_JOB_ID": "99",
                "SLURM_LOCALID": str(rank % 2),
                "SLURM_TOPOLOGY_ADDR": "x",  # one of the many a job sets: only counted in the text
            },
        )
        for rank in range(3)
    ]
    text = to_text(_report(ranks))
    lines = text.splitlines()
    assert "3 rank(s) on 2 host(s): gpu000, gpu001" in lines
    header = next(index for index, line in enumerate(lines) if line.split()[:2] == ["rank", "host"])
    table = lines[header : header + 5]
    column = table[0].index("host")
    assert [line[column : column + 6] for line in table[2:]] == ["gpu000", "gpu000", "gpu001"]
    assert [line.split()[0] for line in table[2:]] == ["0", "1", "2"]
    assert "cuda:1 (NVIDIA H100)" in table[3]
    assert "  SLURM_JOB_ID   99" in lines
    assert "  SLURM_LOCALID  0, 1, 0  (per rank)" in lines
    assert "  and 1 more SLURM_* variable(s): see --json" in lines
    assert "  MPI CUDA-aware  yes (reported by the MPI library)" in lines
    assert "  nvcc            not on PATH" in lines
    assert "  HPCOPT_DATA_DIR is not set" not in text
