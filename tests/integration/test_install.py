"""A plain, non-editable ``pip install`` of the repository into a fresh venv, used from outside the source tree.

Only an installed copy shows that ``install_requires`` is complete (an install without
extras trains) and that the files kept outside the package (the job templates,
installed with ``data_files``) are found under the venv's prefix.  The venv is built
once for the module: ``python -m venv --without-pip``; torch is the one requirement
placed there by hand, the way the Makefile installs it before hpcopt (pip would
otherwise choose a multi-GB CUDA build): the torch this suite runs with, and the
distributions it requires, are linked into the venv's site-packages with their
metadata, so pip sees them installed (unpacking the wheel again costs 30-60 s).  Then
this interpreter's pip (``--python``, ``--no-compile``) installs a copy of the
repository with everything else it declares; the copy keeps the build's ``build/``
and ``*.egg-info`` out of the checkout, and is deleted before anything runs, so
nothing can fall back on the source tree.

Skipped, with the reason, when pip cannot resolve mpich from its index.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import distribution, version
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# The torch this suite runs with (the Makefile's torch==2.13.0): the wheel pip has at hand.
TORCH = f"torch=={version('torch').split('+')[0]}"
# Not copied: virtual environments, build output, caches, run logs, data.
COPY_IGNORE = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "runs", "shared", "*.h5"
)


@dataclass
class Installed:
    bin: Path  # the fresh venv's bin/
    work: Path  # an empty directory outside the source tree
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            cwd=self.work,
            env=self.env,
            timeout=timeout,
            check=False,
        )


def _clean_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.pop("HPCOPT_SITE_MPI", None)  # the default install, with mpich
    env.pop("HPCOPT_TEMPLATE_DIR", None)
    # Nothing in the user's site-packages may stand in for a missing requirement.
    env["PYTHONNOUSERSITE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _tail(done: subprocess.CompletedProcess[str]) -> str:
    return "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:])


def _link_distribution(name: str, site: Path, seen: set[str] | None = None) -> None:
    """Link an installed distribution and, recursively, what it requires into ``site``."""
    seen = set() if seen is None else seen
    key = name.lower().replace("-", "_")
    if key in seen:
        return
    seen.add(key)
    dist = distribution(name)
    tops = {Path(str(file)).parts[0] for file in dist.files or [] if not str(file).startswith("..")}
    for top in sorted(tops):
        source = Path(str(dist.locate_file(top)))
        if source.exists() and not (site / top).exists():
            (site / top).symlink_to(source)
    for requirement in dist.requires or []:
        if "extra ==" in requirement:
            continue
        _link_distribution(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0], site, seen)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("install")
    assert REPO not in root.parents
    env = _clean_env()
    venv = root / "venv"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env, timeout=120)
    # This interpreter's pip installs into the venv: no pip of its own to bootstrap (ensurepip
    # costs ~8 s), and --no-compile skips byte-compiling all of torch (~20 s); hpcopt's first
    # run compiles only what it imports.
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "--no-input"]

    probe = subprocess.run(
        [*pip, "install", "--dry-run", "--quiet", "--retries", "0", "--timeout", "15", "mpich"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    if probe.returncode != 0:
        # pip's first ERROR line names the requirement it could not find.
        lines = probe.stderr.strip().splitlines()
        reason = next((line for line in lines if line.startswith("ERROR")), lines[-1] if lines else "no output")
        pytest.skip(f"pip cannot resolve mpich from its index: {reason}")
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            timeout=60,
        ).stdout.strip()
    )
    _link_distribution("torch", site)
    torch_seconds = time.perf_counter() - started
    source = root / "source"
    shutil.copytree(REPO, source, ignore=COPY_IGNORE)
    done = subprocess.run(
        [*pip, "install", "--quiet", "--no-compile", str(source)],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, _tail(done)
    shutil.rmtree(source)
    hpcopt_seconds = time.perf_counter() - started - torch_seconds
    print(
        f"\nfresh venv: venv, index probe and linked torch in {torch_seconds:.1f} s; "
        f"copy, build and install of hpcopt with its requirements in {hpcopt_seconds:.1f} s"
    )
    work = root / "work"
    work.mkdir()
    yield Installed(venv / "bin", work, env)
    # About 1 GB, mostly torch; pytest would keep it with the last three runs' temporary files.
    shutil.rmtree(venv, ignore_errors=True)


def test_the_installed_copy_is_used(installed: Installed) -> None:
    done = installed.run(
        "python",
        "-c",
        "import hpcopt, importlib.metadata as m; from hpcopt.jobs.render import template_dir; "
        "print(hpcopt.__file__, template_dir(), m.version('torch'), sep='\\n')",
    )
    assert done.returncode == 0, _tail(done)
    package, templates, torch_version = done.stdout.split()
    prefix = installed.bin.parent
    assert Path(package).is_relative_to(prefix / "lib")
    assert Path(templates) == prefix / "share" / "hpcopt" / "jobs" / "templates"
    # Installing hpcopt kept the torch placed before it (install_requires leaves torch unpinned).
    assert TORCH == f"torch=={torch_version.split('+')[0]}"


def test_plain_install_trains_and_analyzes(installed: Installed) -> None:
    done = installed.run("hpcopt", "train", "--problem", "allen-cahn", "--epochs", "1", "--out", "x.h5")
    assert done.returncode == 0, _tail(done)
    assert (installed.work / "x.h5").is_file()
    table = installed.run("hpcopt", "analyze", "x.h5")
    assert table.returncode == 0, _tail(table)
    assert "allen-cahn" in table.stdout and "completed" in table.stdout
    # matplotlib is the plot extra, not a requirement: without it --plot is a one-line error.
    plot = installed.run("hpcopt", "analyze", "x.h5", "--plot", "figures")
    assert plot.returncode == 2 and "matplotlib" in plot.stderr and "Traceback" not in plot.stderr, _tail(plot)


@pytest.mark.parametrize("template", ["cpu", "gpu"])
def test_render_uses_the_installed_templates(installed: Installed, template: str) -> None:
    outdir = installed.work / f"sweep-{template}"
    args = ["--study", "strong", "--ranks", "1,2", "--batch-size", "8", "--problem", "allen-cahn"]
    done = installed.run("hpcopt", "jobs", "render", *args, "--template", template, "--outdir", str(outdir))
    assert done.returncode == 0, _tail(done)
    script = outdir / "strong-default-P2.sbatch"
    assert done.stdout.split()[-1] == str(outdir / "submit.sh") and script.is_file()
    text = script.read_text()
    source = (REPO / "jobs" / "templates" / f"{template}.sbatch").read_text()
    fixed = [line for line in source.splitlines() if line and "$" not in line]
    assert [line for line in text.splitlines() if line in fixed] == fixed
    # The jobs run the venv's interpreter, which found the templates.
    assert f"{installed.bin / 'python'} -m mpi4py -m hpcopt train" in text
