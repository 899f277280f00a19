"""Tests of hpcopt.jobs.render: rendered SLURM scripts and the local sweep runner."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hpcopt.analysis.tables import load_run
from hpcopt.errors import ConfigError
from hpcopt.jobs.render import SweepSpec, parse_ranks, render_sweep
from tests.conftest import run_hpcopt

TINY = ["--epochs", "2", "--set", "problem.n=200"]


def test_parse_ranks() -> None:
    assert parse_ranks("4,1,2") == [1, 2, 4]
    for bad in ("", "1,x", "0,2", "2,2"):
        with pytest.raises(ConfigError):
            parse_ranks(bad)


@pytest.mark.parametrize(("study", "batches"), [("strong", [64, 64, 64]), ("weak", [64, 128, 256])])
def test_render_cpu_sweep(tmp_path: Path, study: str, batches: list[int]) -> None:
    spec = SweepSpec(
        study=study,
        ranks=[1, 2, 4],
        batch_size=64,
        problem="logistic",
        optimizer="sgd",
        outdir=str(tmp_path),
        ranks_per_node=2,
        threads=3,
        train_args=TINY,
        sbatch_options=["--partition=cpu"],
    )
    scripts = render_sweep(spec)
    assert [path.name for path in scripts] == [f"{study}-sgd-P{p}.sbatch" for p in (1, 2, 4)] + ["submit.sh"]
    for path, ranks, batch in zip(scripts, (1, 2, 4), batches):
        text = path.read_text()
        assert f"#SBATCH --ntasks={ranks}\n" in text
        assert f"#SBATCH --nodes={(ranks + 1) // 2}\n" in text  # 2 ranks per node
        assert "#SBATCH --cpus-per-task=3\n" in text and "#SBATCH --partition=cpu\n" in text
        assert f"--batch-size {batch} --epochs 2 --set problem.n=200" in text
        assert "srun --mpi=pmi2" in text and "-m mpi4py -m hpcopt train" in text
        assert "RUN_LOG=" + str(tmp_path) + f"/{study}-sgd-P{ranks}-$" + "{SLURM_JOB_ID}.h5" in text
        assert '--threads "$OMP_NUM_THREADS"' in text
        assert "--device" not in text  # CPU jobs keep train's default (auto)
        # Valid bash, every template placeholder filled.
        assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
        assert "${study}" not in text and "$$" not in text
    submit = scripts[-1].read_text()
    assert submit.count("sbatch --parsable") == 3
    assert subprocess.run(["bash", "-n", str(scripts[-1])], check=False).returncode == 0


def test_render_gpu_binds_one_gpu_per_rank(tmp_path: Path) -> None:
    spec = SweepSpec("strong", [8], 512, template="gpu", outdir=str(tmp_path), ranks_per_node=4, train_args=["--x"])
    text = render_sweep(spec)[0].read_text()
    assert "#SBATCH --nodes=2\n" in text and "#SBATCH --gpus-per-node=4\n" in text
    assert "CUDA_VISIBLE_DEVICES=${SLURM_LOCALID:-${MPI_LOCALRANKID:-" in text
    assert "--batch-size 512 --x" in text  # extra args pass through
    # The GPU jobs train on the GPU; a --device after "--" comes later on the line and wins.
    assert "-m hpcopt train --device cuda --batch-size 512 --x" in text
    assert subprocess.run(["bash", "-n", str(tmp_path / "strong-default-P8.sbatch")], check=False).returncode == 0


def test_render_rejects_bad_sweeps(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="share equally"):
        render_sweep(SweepSpec("strong", [1, 3], 64, outdir=str(tmp_path)))
    with pytest.raises(ConfigError, match="--study"):
        render_sweep(SweepSpec("diagonal", [1], 64, outdir=str(tmp_path)))
    with pytest.raises(ConfigError, match="set by the sweep"):
        render_sweep(SweepSpec("weak", [1], 64, outdir=str(tmp_path), train_args=["--out", "x.h5"]))


def test_cli_render_and_error_line(tmp_path: Path) -> None:
    args = ["jobs", "render", "--study", "weak", "--ranks", "1,2", "--batch-size", "50", "--problem", "logistic"]
    done = run_hpcopt([*args, "--outdir", str(tmp_path), "--", *TINY])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "weak-default-P2.sbatch").exists() and (tmp_path / "submit.sh").exists()
    bad = run_hpcopt([*args[:8], "--outdir", str(tmp_path), "--template", "tpu"])
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["hpcopt: error: --template must be one of cpu, gpu, got 'tpu'"]


@pytest.mark.timeout(180)
def test_local_sweep_writes_logs_and_scaling_table(tmp_path: Path) -> None:
    args = ["jobs", "local", "--study", "strong", "--ranks", "1,2", "--batch-size", "100"]
    done = run_hpcopt([*args, "--problem", "logistic", "--optimizer", "sgd", "--outdir", str(tmp_path), "--", *TINY])
    assert done.returncode == 0, done.stderr
    logs = sorted(tmp_path.glob("*.h5"))
    assert [path.name for path in logs] == ["strong-sgd-P1-local.h5", "strong-sgd-P2-local.h5"]
    runs = [load_run(path) for path in logs]
    assert [run.attributes["world_size"] for run in runs] == [1, 2]
    assert [run.attributes["batch_size"] for run in runs] == [100, 100]
    assert all(run.status == "completed" for run in runs)
    assert "scaling (median time per iteration" in done.stdout
