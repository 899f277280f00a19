"""End to end on a real (single-node) SLURM: render a sweep, sbatch it, analyze the run logs.

The session fixture installs ``slurm-wlm`` and ``munge`` with apt when missing (root
only), starts ``munged``, ``slurmctld`` and ``slurmd`` (tests/integration/slurm_cluster.py), and
stops exactly those processes afterwards.  Without SLURM the test is skipped with the
reason.  ``HPCOPT_SKIP_SLURM=1`` skips it on purpose.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcopt.analysis.tables import load_run
from tests.conftest import REPO, run_hpcopt
from tests.integration.slurm_cluster import ClusterUnavailable, SlurmCluster, start_cluster, wait_for_jobs

TINY = ["--", "--epochs", "2", "--set", "problem.n=200"]


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    if os.environ.get("HPCOPT_SKIP_SLURM") == "1":
        pytest.skip("HPCOPT_SKIP_SLURM=1")
    try:
        cluster = start_cluster(install_timeout=150)
    except ClusterUnavailable as error:
        pytest.skip(f"no SLURM cluster: {error}")
    print(f"\nSLURM test cluster up; install took {cluster.install_seconds:.1f} s")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sbatch_strong_and_weak_sweep(slurm: SlurmCluster, tmp_path: Path) -> None:
    job_ids: list[str] = []
    for study in ("strong", "weak"):
        outdir = tmp_path / study
        sweep = ["--study", study, "--ranks", "1,2", "--batch-size", "100", "--problem", "logistic"]
        slurm_options = ["--ranks-per-node", "2", "--time", "00:05:00", "--sbatch-option=--overcommit"]
        render = run_hpcopt(
            ["jobs", "render", *sweep, "--optimizer", "sgd", "--outdir", str(outdir), *slurm_options, *TINY]
        )
        assert render.returncode == 0, render.stderr
        submit = subprocess.run(
            ["bash", str(outdir / "submit.sh")], capture_output=True, text=True, env=slurm.env, cwd=REPO, timeout=60
        )
        assert submit.returncode == 0, submit.stderr + slurm.log_tail()
        job_ids += (outdir / "jobids.txt").read_text().split()
    assert len(job_ids) == 4
    states = wait_for_jobs(slurm, job_ids, timeout=240)
    outputs = "\n".join(path.read_text() for path in tmp_path.glob("*/*.out"))
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{outputs}\n{slurm.log_tail()}"

    logs = sorted(tmp_path.glob("*/*.h5"))
    assert [path.name.rsplit("-", 1)[0] for path in logs] == [
        "strong-sgd-P1",
        "strong-sgd-P2",
        "weak-sgd-P1",
        "weak-sgd-P2",
    ]
    # One file per job id; the ranks and batches the sweep asked for.
    assert sorted(path.stem.rsplit("-", 1)[1] for path in logs) == sorted(job_ids)
    runs = {path.name.rsplit("-", 1)[0]: load_run(path) for path in logs}
    assert all(run.status == "completed" for run in runs.values())
    assert runs["strong-sgd-P2"].attributes["world_size"] == 2
    assert runs["strong-sgd-P2"].attributes["batch_size"] == 100
    assert runs["weak-sgd-P2"].attributes["batch_size"] == 200

    analyze = run_hpcopt(["analyze", str(tmp_path / "strong"), str(tmp_path / "weak")])
    assert analyze.returncode == 0, analyze.stderr
    scaling = analyze.stdout.split("scaling (median time per iteration")[1].splitlines()[3:]
    assert [line.split()[:4] for line in scaling if line.strip()] == [
        ["strong", "sgd", "1", "100"],
        ["strong", "sgd", "2", "100"],
        ["weak", "sgd", "1", "100"],
        ["weak", "sgd", "2", "200"],
    ]
