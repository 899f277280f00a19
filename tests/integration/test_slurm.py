"""End to end on a real (single-node) SLURM: render a sweep, sbatch it, analyze the run logs;
a requeue-mode job that is signalled, requeues itself and resumes bit for bit.

The session fixture installs ``slurm-wlm`` and ``munge`` with apt when missing (root
only), starts ``munged``, ``slurmctld`` and ``slurmd`` (tests/integration/slurm_cluster.py), and
stops exactly those processes afterwards.  Without SLURM the test is skipped with the
reason.  ``HPCOPT_SKIP_SLURM=1`` skips it on purpose.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import pytest
import torch

from hpcopt.analysis.tables import load_run
from tests.conftest import REPO, logged_rows, run_hpcopt
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


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_requeue_mode_stops_requeues_and_resumes_bit_for_bit(slurm: SlurmCluster, tmp_path: Path) -> None:
    # SIGUSR1 to the job step's tasks is what `#SBATCH --signal=USR1@N` delivers N seconds
    # before the time limit; `scancel --signal=USR1` sends it now, so the test need not wait
    # for a time limit (minutes).  A fault pauses every rank in step 5, so the signal lands there.
    outdir = tmp_path / "requeue"
    train = ["--epochs", "3", "--set", "problem.n=400", "--set", "lr=0.5"]
    sweep = ["--study", "strong", "--ranks", "2", "--batch-size", "80", "--problem", "logistic", "--optimizer", "sgd"]
    slurm_options = ["--ranks-per-node", "2", "--time", "00:05:00", "--sbatch-option=--overcommit"]
    requeue = ["--requeue", "--signal-seconds", "60"]
    render = run_hpcopt(["jobs", "render", *sweep, "--outdir", str(outdir), *slurm_options, *requeue, "--", *train])
    assert render.returncode == 0, render.stderr
    script = (outdir / "strong-sgd-P2.sbatch").read_text()
    assert "#SBATCH --requeue\n#SBATCH --open-mode=append\n#SBATCH --signal=USR1@60\n" in script
    env = {**slurm.env, "HPCOPT_FAULT": "step=5,where=gradient,kind=hang,seconds=4", "OMP_NUM_THREADS": "1"}
    submit = subprocess.run(
        ["sbatch", "--parsable", "strong-sgd-P2.sbatch"],
        capture_output=True,
        text=True,
        env=env,
        cwd=outdir,
        timeout=60,
    )
    assert submit.returncode == 0, submit.stderr + slurm.log_tail()
    job = submit.stdout.strip().split(";")[0]
    first = outdir / f"strong-sgd-P2-{job}.h5"
    second = outdir / f"strong-sgd-P2-{job}.r1.h5"
    output = outdir / f"strong-sgd-P2-{job}.out"

    _wait(lambda: logged_rows(first) >= 4, 120, f"job {job} did not reach step 5\n{slurm.log_tail()}")
    time.sleep(1.5)  # past the ranks' agreement after step 4 (step 5 pauses longer), as in test_preemption
    assert slurm.run("scancel", "--signal=USR1", job).returncode == 0
    # A requeued job waits out its revoked credential before it restarts (cred_expire: 10 s
    # on the test cluster, 120 s by default).  Lifting that hold instead makes the restart
    # fail with "Job credential revoked" (seen in CI).
    shown = lambda: slurm.run("scontrol", "show", "job", job).stdout  # noqa: E731
    _wait(lambda: "Restarts=1" in shown(), 60, f"job {job} was not requeued\n{output.read_text()}")
    states = wait_for_jobs(slurm, [job], timeout=180)
    text = output.read_text()
    assert states == {job: "COMPLETED"}, f"{states}\n{text}\n{slurm.log_tail()}"
    assert f"hpcopt: preempted by SIGUSR1 after step 5: run log {first} closed as preempted" in text, text
    assert f"requeueing job {job}" in text

    with h5py.File(first, "r") as log:
        assert (log.attrs["status"], log["iterations/step"][:].tolist()) == ("preempted", [1, 2, 3, 4, 5])
        losses = log["iterations/loss"][:].tolist()
    with h5py.File(second, "r") as log:
        assert log.attrs["status"] == "completed"
        assert log.attrs["previous_log"] == str(first)
        assert log["iterations/step"][:].tolist() == list(range(6, 16))
        losses += log["iterations/loss"][:].tolist()

    # The same training, uninterrupted, at the same rank count.
    same = ["--problem", "logistic", "--optimizer", "sgd", "--batch-size", "80", *train, "--quiet"]
    files = ["--out", str(tmp_path / "reference.h5"), "--checkpoint", str(tmp_path / "reference.ckpt")]
    reference = run_hpcopt(["train", *same, *files], ranks=2)
    assert reference.returncode == 0, reference.stderr
    expected = torch.load(tmp_path / "reference.ckpt", weights_only=True)
    got = torch.load(outdir / f"strong-sgd-P2-{job}.ckpt", weights_only=True)
    assert got["step"] == expected["step"] == 15
    assert torch.equal(got["parameters"], expected["parameters"])
    with h5py.File(tmp_path / "reference.h5", "r") as log:
        assert losses == log["iterations/loss"][:].tolist()
