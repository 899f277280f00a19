"""A throw-away single-node SLURM cluster for the tests (and by hand: ``python tests/integration/slurm_cluster.py``).

:func:`start_cluster` installs Debian's ``slurm-wlm`` and ``munge`` with apt when they
are missing (root only), writes a ``slurm.conf`` and a munge key into a private
directory, and starts ``munged``, ``slurmctld`` and ``slurmd`` in the foreground as
child processes (no systemd).  Its own socket, ports and state directories keep it
apart from any cluster already on the machine.  :meth:`SlurmCluster.stop` ends exactly
those three PIDs.  Every client command needs ``SLURM_CONF`` from :attr:`SlurmCluster.env`.

Settings that make SLURM run in a container: ``ProctrackType=proctrack/linuxproc`` and
``TaskPlugin=task/none`` (no cgroups), the node line from ``slurmd -C``,
``SelectType=select/cons_tres`` with ``CR_Core``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
PACKAGES = ("slurm-wlm", "munge")


class ClusterUnavailable(RuntimeError):
    """SLURM is not installed and cannot be, or its daemons did not come up (the message says why)."""


def _find(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(path) for path in (Path("/usr/sbin") / name, Path("/sbin") / name) if path.exists()), None
    )


def install(timeout: float = 240) -> float:
    """``apt-get install slurm-wlm munge`` if a daemon is missing; returns the seconds it took (0 if none)."""
    if all(_find(name) for name in (*DAEMONS, "sbatch")):
        return 0.0
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("SLURM is not installed and apt-get is not available to install it")
    if os.geteuid() != 0:
        raise ClusterUnavailable("SLURM is not installed and installing it needs root")
    start = time.perf_counter()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise ClusterUnavailable(f"{' '.join(command)} ran past {timeout} s") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ClusterUnavailable(f"{' '.join(command)} failed: {last}")
    missing = [name for name in (*DAEMONS, "sbatch") if not _find(name)]
    if missing:
        raise ClusterUnavailable(f"after installing {', '.join(PACKAGES)}, still missing: {', '.join(missing)}")
    return time.perf_counter() - start


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class SlurmCluster:
    """The running daemons of one test cluster."""

    root: Path
    conf: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    install_seconds: float = 0.0

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=timeout, check=False)

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / name
            if path.exists():
                out.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        """End the daemons this cluster started (by PID, slurmd first), then remove its directory."""
        for name in reversed(DAEMONS):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def _first_job_id() -> int:
    """A fresh job id range per cluster: MPICH names its shared memory after the job and step
    ids, and a segment an aborted job left behind in /dev/shm must not meet a later job 1."""
    return 1000 + int.from_bytes(os.urandom(3), "big")


def _write_config(root: Path, munge_socket: Path) -> Path:
    node_line = subprocess.run([_find("slurmd") or "slurmd", "-C"], capture_output=True, text=True, check=False)
    first = node_line.stdout.splitlines()[0] if node_line.stdout else ""
    if not first.startswith("NodeName="):
        raise ClusterUnavailable(f"slurmd -C did not describe this node: {node_line.stderr.strip()}")
    host = first.split()[0].removeprefix("NodeName=")
    for name in ("state", "spool"):
        (root / name).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(
        f"""\
ClusterName=hpcopt-test
FirstJobId={_first_job_id()}
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=10
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmdTimeout=120
{first} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf


def start_cluster(*, install_timeout: float = 240, ready_timeout: float = 45) -> SlurmCluster:
    """Install if needed, start munged, slurmctld and slurmd, wait until the node is idle."""
    seconds = install(install_timeout)
    root = Path(tempfile.mkdtemp(prefix="hpcopt-slurm-"))
    root.chmod(0o700)
    munge_socket = root / "munge.socket"
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    cluster = SlurmCluster(root, _write_config(root, munge_socket), install_seconds=seconds)
    commands = {
        "munged": [
            _find("munged") or "munged",
            "--foreground",
            "--force",
            f"--socket={munge_socket}",
            f"--key-file={key}",
            f"--pid-file={root}/munged.pid",
            f"--log-file={root}/munged.log",
            f"--seed-file={root}/munged.seed",
        ],
        "slurmctld": [_find("slurmctld") or "slurmctld", "-D", "-c", "-i", "-f", str(cluster.conf)],
        "slurmd": [_find("slurmd") or "slurmd", "-D", "-f", str(cluster.conf)],
    }
    try:
        for name in DAEMONS:
            stream = open(root / f"{name}.stdout", "w")  # the daemon keeps its own copy
            cluster.processes[name] = subprocess.Popen(
                commands[name], stdout=stream, stderr=subprocess.STDOUT, env=cluster.env, start_new_session=True
            )
            stream.close()
            if name == "munged":
                deadline = time.monotonic() + 10
                while not munge_socket.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
        deadline = time.monotonic() + ready_timeout
        state = ""
        while time.monotonic() < deadline:
            for name, process in cluster.processes.items():
                if process.poll() is not None:
                    raise ClusterUnavailable(f"{name} exited with status {process.returncode}\n{cluster.log_tail()}")
            done = cluster.run("sinfo", "-h", "-o", "%T")
            state = done.stdout.strip()
            if state.startswith("idle"):
                return cluster
            time.sleep(0.5)
        raise ClusterUnavailable(f"node not idle after {ready_timeout} s (state {state!r})\n{cluster.log_tail()}")
    except BaseException:
        cluster.stop()
        raise


def wait_for_jobs(cluster: SlurmCluster, job_ids: list[str], timeout: float) -> dict[str, str]:
    """Poll until every job has left the queue; returns ``{job id: final state}`` (``scontrol``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = cluster.run("squeue", "-h", "-o", "%i", "-j", ",".join(job_ids))
        if queue.returncode == 0 and not queue.stdout.strip():
            break
        time.sleep(1)
    else:
        cluster.run("scancel", *job_ids)
        raise TimeoutError(f"SLURM jobs {', '.join(job_ids)} not finished after {timeout} s")
    states = {}
    for job in job_ids:
        shown = cluster.run("scontrol", "show", "job", job).stdout
        states[job] = next((word.split("=", 1)[1] for word in shown.split() if word.startswith("JobState=")), "UNKNOWN")
    return states


if __name__ == "__main__":
    # By hand: start a cluster, print how to use it, stop it on Enter.
    started = start_cluster()
    print(f"SLURM up (installed in {started.install_seconds:.1f} s): export SLURM_CONF={started.conf}")
    try:
        input("press Enter to stop the cluster ")
    finally:
        started.stop()
    sys.exit(0)
