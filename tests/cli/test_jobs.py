"""Tests of hpcopt.jobs: rendered SLURM scripts, where their templates come from, and the local sweep runner."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcopt import cli
from hpcopt.analysis.tables import load_run
from hpcopt.errors import ConfigError
from hpcopt.jobs import render
from hpcopt.jobs.render import SweepSpec, parse_ranks, render_sweep, template_dir
from hpcopt.problems import make_problem
from tests.conftest import REPO, logged_rows, run_hpcopt

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


def test_templates_are_the_files_in_jobs_templates(tmp_path: Path) -> None:
    # A source checkout renders the files in place (an installed copy: tests/integration/test_install.py).
    assert template_dir() == REPO / "jobs" / "templates"
    for template in render.TEMPLATES:
        spec = SweepSpec("weak", [2], 8, template=template, outdir=str(tmp_path / template))
        text = render_sweep(spec)[0].read_text()
        source = (REPO / "jobs" / "templates" / render.TEMPLATE_FILES[template]).read_text()
        # Every line without a placeholder or escape comes through unchanged, in order
        # (blank ones aside: an empty ${sbatch_lines} renders as one).
        fixed = [line for line in source.splitlines() if line and "$" not in line]
        assert [line for line in text.splitlines() if line in fixed] == fixed


def test_submit_script_is_exact(tmp_path: Path) -> None:
    submit = render_sweep(SweepSpec("weak", [2, 1], 8, outdir=str(tmp_path)))[-1]
    assert submit.read_text() == (
        "#!/bin/bash\n"
        f"# Submit every point of this weak-scaling sweep; job ids go to {shlex.quote(str(tmp_path))}/jobids.txt.\n"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n'
        ": > jobids.txt\n"
        'sbatch --parsable "$@" weak-default-P2.sbatch | cut -d";" -f1 >> jobids.txt\n'
        'sbatch --parsable "$@" weak-default-P1.sbatch | cut -d";" -f1 >> jobids.txt\n'
        "echo \"submitted $(wc -l < jobids.txt) job(s): $(tr '\\n' ' ' < jobids.txt)\"\n"
    )


def test_template_dir_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site_dir = tmp_path / "site"
    shutil.copytree(REPO / "jobs" / "templates", site_dir)
    (site_dir / "cpu.sbatch").write_text("#!/bin/bash\nmodule load site-mpi\n${python} -m hpcopt train ${train_args}\n")
    monkeypatch.setenv("HPCOPT_TEMPLATE_DIR", str(site_dir))
    assert template_dir() == site_dir
    spec = SweepSpec("strong", [1], 8, outdir=str(tmp_path / "out"), python="py")
    assert render_sweep(spec)[0].read_text() == "#!/bin/bash\nmodule load site-mpi\npy -m hpcopt train --batch-size 8\n"
    # A site's slip is a one-line error naming the file, not a traceback.
    for body, message in (("${nodes} ${node}\n", "unknown placeholder 'node'"), ("echo $(date)\n", "write \\$\\$")):
        (site_dir / "cpu.sbatch").write_text(body)
        with pytest.raises(ConfigError, match=f"job template {re.escape(str(site_dir / 'cpu.sbatch'))}: .*{message}"):
            render_sweep(spec)
    # A directory missing one of the files is passed over, not half used.
    (site_dir / "submit.sh").unlink()
    assert template_dir() == REPO / "jobs" / "templates"


def test_render_rejects_bad_sweeps(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one rank count"):
        render_sweep(SweepSpec("strong", [], 64, outdir=str(tmp_path)))
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


def test_render_takes_the_problems_default_batch_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --set problem.n=200 after -- makes logistic's default batch (its whole training set) 200.
    args = ["jobs", "render", "--study", "strong", "--ranks", "1,2", "--problem", "logistic"]
    assert cli.main([*args, "--outdir", str(tmp_path), "--", *TINY]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "global batch 200: the default of problem logistic (--batch-size to change it)"
    assert lines[-1] == str(tmp_path / "submit.sh")
    # What hpcopt train resolves without --batch-size, by the same rule.
    assert make_problem("logistic", options={"n": 200}).resolve_batch_size() == 200
    for ranks in (1, 2):
        assert "--batch-size 200 " in (tmp_path / f"strong-default-P{ranks}.sbatch").read_text()


def test_default_batch_size_errors_name_the_way_out(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    weak = ["jobs", "render", "--study", "weak", "--ranks", "1,2", "--problem", "logistic", "--outdir", str(tmp_path)]
    assert cli.main([*weak, "--", *TINY]) == 2
    assert capfd.readouterr().err.strip() == (
        "hpcopt: error: weak scaling with problem logistic's default batch of 200 per rank needs 400 training "
        "samples at 2 ranks, but the problem has 200; give --batch-size (per rank)"
    )
    strong = ["jobs", "render", "--study", "strong", "--ranks", "1,3", "--problem", "logistic"]
    assert cli.main([*strong, "--outdir", str(tmp_path), "--", *TINY]) == 2
    assert capfd.readouterr().err.strip() == (
        "hpcopt: error: strong scaling with problem logistic's default global batch of 200: 3 ranks cannot "
        "share it equally; give --batch-size (divisible by every rank count)"
    )
    missing = ["jobs", "local", "--study", "strong", "--ranks", "1", "--problem", "mnist", "--outdir", str(tmp_path)]
    assert cli.main([*missing, "--", "--data-dir", str(tmp_path / "none")]) == 2
    error = capfd.readouterr().err.strip()
    assert error.startswith("hpcopt: error: without --batch-size the sweep takes problem mnist's default batch")
    assert "does not exist" in error
    assert not list(tmp_path.glob("*.sbatch")) and not list(tmp_path.glob("*.h5"))


@pytest.mark.timeout(180)
def test_local_sweep_takes_the_problems_default_batch_size(tmp_path: Path) -> None:
    args = ["jobs", "local", "--study", "strong", "--ranks", "1", "--problem", "logistic", "--optimizer", "sgd"]
    done = run_hpcopt([*args, "--outdir", str(tmp_path), "--", "--epochs", "1", "--set", "problem.n=200"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("global batch 200: the default of problem logistic")
    (run,) = [load_run(path) for path in tmp_path.glob("*.h5")]
    assert run.attributes["batch_size"] == 200 and run.status == "completed"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sbatch_options": ["--mem=1G\ntouch x"]}, "--sbatch-option must be one line without control characters"),
        ({"sbatch_options": ["--mem=1G\rtouch x"]}, "--sbatch-option must be one line"),
        ({"time": "yesterday"}, "--time must be a SLURM time limit"),
        ({"time": "00:30:00\ntouch x"}, "--time must be one line"),
        ({"optimizer": "sgd\ntouch x"}, "--optimizer must be a plain name"),
        ({"optimizer": "sgd x"}, "--optimizer must be a plain name"),
        ({"problem": "logistic\ntouch x"}, "--problem must be one line"),
        ({"python": "/usr/bin/python3\ntouch x"}, "--python must be one line"),
        ({"train_args": ["--set", "lr=1\ntouch x"]}, "an hpcopt train argument after -- must be one line"),
        ({"signal_seconds": 0}, "--signal-seconds must be between 1 and 65535"),
        ({"requeue": True, "train_args": ["--resume", "x.ckpt"]}, "--resume is set by --requeue"),
    ],
)
def test_no_value_can_add_a_line_to_a_script(tmp_path: Path, change: dict[str, object], message: str) -> None:
    spec = SweepSpec("strong", [1], 8, outdir=str(tmp_path), **change)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=re.escape(message)):
        render_sweep(spec)
    assert not list(tmp_path.iterdir())  # nothing written
    newline_dir = tmp_path / "a\ntouch x"
    with pytest.raises(ConfigError, match="--outdir must be one line"):
        render_sweep(SweepSpec("strong", [1], 8, outdir=str(newline_dir)))
    assert not newline_dir.exists()


@pytest.mark.parametrize("time", ["30", "1:00", "00:30:00", "1-0", "2-12:00", "1-00:00:00", "UNLIMITED"])
def test_slurm_time_formats_are_accepted(tmp_path: Path, time: str) -> None:
    (script, _) = render_sweep(SweepSpec("strong", [1], 8, outdir=str(tmp_path), time=time))
    assert f"#SBATCH --time={time}\n" in script.read_text()


def test_cli_refuses_an_option_that_adds_a_line(tmp_path: Path) -> None:
    args = ["jobs", "render", "--study", "strong", "--ranks", "1", "--batch-size", "8", "--outdir", str(tmp_path)]
    done = run_hpcopt([*args, "--sbatch-option", "--mem=1G\ntouch x"])
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "hpcopt: error: --sbatch-option must be one line without control characters, got '--mem=1G\\ntouch x'"
    ]
    done = run_hpcopt([*args, "--time", "yesterday"])
    assert done.returncode == 2 and "--time must be a SLURM time limit" in done.stderr
    assert not list(tmp_path.iterdir())


def _fake_tools(bin_dir: Path, train_status: int) -> None:
    """A launcher that records its arguments and exits with ``train_status``, and an scontrol that records its own."""
    bin_dir.mkdir()
    for name, body in (
        ("launch", f'printf "%s\\n" "$@" > "$(dirname "$0")/train-args"\nexit {train_status}\n'),
        ("scontrol", 'echo "$@" >> "$(dirname "$0")/scontrol-calls"\n'),
    ):
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}")
        (bin_dir / name).chmod(0o755)


@pytest.mark.parametrize(("restart", "status"), [(0, 75), (1, 0), (1, 2)])
def test_requeue_mode_script_requeues_on_75_and_resumes_after_a_restart(
    tmp_path: Path, restart: int, status: int
) -> None:
    outdir = tmp_path / "out"
    spec = SweepSpec("strong", [2], 8, outdir=str(outdir), optimizer="sgd", requeue=True, signal_seconds=90)
    script = render_sweep(spec)[0]
    text = script.read_text()
    assert "#SBATCH --requeue\n#SBATCH --open-mode=append\n#SBATCH --signal=USR1@90\n" in text
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    bin_dir = tmp_path / "bin"
    _fake_tools(bin_dir, status)
    checkpoint = outdir / "strong-sgd-P2-42.ckpt"
    if restart:
        checkpoint.write_bytes(b"")  # the checkpoint the stopped run wrote
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HPCOPT_LAUNCH": str(bin_dir / "launch"),
        "SLURM_JOB_ID": "42",
        "SLURM_RESTART_COUNT": str(restart),
    }
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == status, done.stderr
    args = (bin_dir / "train-args").read_text().splitlines()
    log = outdir / ("strong-sgd-P2-42.r1.h5" if restart else "strong-sgd-P2-42.h5")
    resume = ["--resume", str(checkpoint)] if restart else []
    assert args[args.index("--checkpoint") :] == [
        "--checkpoint",
        str(checkpoint),
        "--stop-signal",
        "USR1",
        *resume,
        "--threads",
        "1",
        "--out",
        str(log),
        "--overwrite",
        "--quiet",
    ]
    calls = bin_dir / "scontrol-calls"
    assert (calls.read_text() if calls.exists() else "") == ("requeue 42\n" if status == 75 else "")


def test_without_requeue_mode_the_script_neither_checkpoints_nor_requeues(tmp_path: Path) -> None:
    script = render_sweep(SweepSpec("strong", [1], 8, outdir=str(tmp_path / "out")))[0]
    assert "#SBATCH --requeue" not in script.read_text()
    bin_dir = tmp_path / "bin"
    _fake_tools(bin_dir, 75)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HPCOPT_LAUNCH": str(bin_dir / "launch"), "SLURM_JOB_ID": "7"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 75
    assert "--checkpoint" not in (bin_dir / "train-args").read_text().splitlines()
    assert not (bin_dir / "scontrol-calls").exists()


@pytest.mark.timeout(180)
def test_local_sweep_forwards_a_signal_once_and_names_the_stopped_point(tmp_path: Path) -> None:
    # Every rank pauses in step 5, so SIGTERM to `hpcopt jobs local` arrives during it;
    # the runner forwards it to mpiexec, which forwards it to the ranks: a graceful stop.
    args = ["jobs", "local", "--study", "strong", "--ranks", "2", "--batch-size", "80", "--problem", "logistic"]
    command = [sys.executable, "-m", "hpcopt", *args, "--optimizer", "sgd", "--outdir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HPCOPT_FAULT": "step=5,where=gradient,kind=hang,seconds=4"}
    process = subprocess.Popen(
        [*command, "--", "--epochs", "3", "--set", "problem.n=400"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = tmp_path / "strong-sgd-P2-local.h5"
    try:
        deadline = time.monotonic() + 120
        while logged_rows(log) < 4:
            assert process.poll() is None and time.monotonic() < deadline, "the point ended or stalled before step 5"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 2
    assert stderr.splitlines() == [
        f"hpcopt: error: sweep point strong-sgd-P2 was preempted by a signal (exit 75); run log {log} closed as "
        f"preempted, later points not run; see {tmp_path / 'strong-sgd-P2-local.out'}"
    ]
    run = load_run(log)
    assert run.status == "preempted"
    assert len(run.iterations["step"]) == 5
