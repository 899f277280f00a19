"""hpcopt: MPI-native distributed trust-region and second-order optimizers."""

import os
import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent


def _files(folder: str, *patterns: str) -> list[str]:
    # Relative to setup.py, as data_files wants them; sorted so that builds are reproducible.
    return sorted(str(p.relative_to(here)) for pattern in patterns for p in (here / folder).glob(pattern))


# See install_requires below.
site_mpi = os.environ.get("HPCOPT_SITE_MPI", "") not in ("", "0")
version = re.search(r'__version__ = "([^"]+)"', (here / "hpcopt" / "__init__.py").read_text()).group(1)

setup(
    name="hpcopt",
    version=version,
    description="MPI-native distributed trust-region and second-order optimizers for neural networks",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    packages=find_packages(include=["hpcopt", "hpcopt.*"]),
    # Files that hpcopt reads at run time but that live outside the package, so that a
    # source checkout uses them in place: the CUDA sources, compiled at run time
    # (hpcopt/kernels/cuda.py), and the SLURM job templates (hpcopt/jobs/render.py).
    # After a non-editable install both look under <prefix>/share/hpcopt.
    data_files=[
        ("share/hpcopt/kernels", _files("kernels", "*.cu*")),
        ("share/hpcopt/jobs/templates", _files("jobs/templates", "*.sbatch", "*.sh")),
    ],
    python_requires=">=3.11",
    # Everything `hpcopt train|analyze|jobs` imports, so that a plain `pip install .`
    # trains: scipy computes the Allen-Cahn and logistic reference solutions; mpi4py >= 4
    # loads an MPI library at run time, and `mpich` is that library (and mpiexec) from
    # PyPI.  torch is deliberately unpinned: the Makefile installs torch==2.13.0 (a CPU
    # wheel) first, and cluster users bring the build that matches their nodes.
    # matplotlib stays an extra: only `hpcopt analyze --plot` imports it, lazily, and
    # says to install hpcopt[plot] when it is missing.
    #
    # Opt-out for a cluster with a site MPI: `HPCOPT_SITE_MPI=1 pip install .` leaves
    # mpich out, so mpi4py (built against the site MPI, or a wheel finding the site's
    # MPICH-ABI libmpi) is not paired with a second MPI whose mpiexec would shadow the
    # site's in the venv's bin/.  (`pip install --no-deps .` plus the list below by hand
    # works too.)  The variable is read when the wheel is built; pip builds a fresh one
    # for every install from a source tree, so it applies to that install.
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "scipy>=1.10",
        "h5py>=3.8",
        "mpi4py>=4.0",
        "tqdm>=4.60",
        *([] if site_mpi else ["mpich"]),
    ],
    extras_require={
        # Kept for `pip install ".[mpich]"` under HPCOPT_SITE_MPI=1 and for the Makefile;
        # without the opt-out it repeats install_requires.
        "mpich": ["mpich"],
        "test": ["pytest>=7", "pytest-mpi>=0.6", "pytest-timeout>=2.1", "ruff", "mypy>=1.8"],
        "plot": ["matplotlib>=3.6"],
        "gpu": ["cupy-cuda12x>=13"],
    },
    entry_points={"console_scripts": ["hpcopt=hpcopt.cli:entry_point"]},
    classifiers=["License :: OSI Approved :: BSD License", "Programming Language :: Python :: 3"],
)
