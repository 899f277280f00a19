"""hpcopt: MPI-native distributed trust-region and second-order optimizers."""

import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "hpcopt" / "__init__.py").read_text()).group(1)

setup(
    name="hpcopt",
    version=version,
    description="MPI-native distributed trust-region and second-order optimizers for neural networks",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    packages=find_packages(include=["hpcopt", "hpcopt.*"]),
    # The CUDA sources are compiled at run time (hpcopt/kernels/cuda.py looks here when
    # they are not beside the package, i.e. after a non-editable install).
    data_files=[("share/hpcopt/kernels", sorted(str(p.relative_to(here)) for p in (here / "kernels").glob("*.cu*")))],
    python_requires=">=3.11",
    # torch is deliberately unpinned here: the Makefile installs torch==2.13.0 (a CPU
    # wheel) first, and cluster users bring the build that matches their nodes.
    install_requires=["torch>=2.1", "numpy>=1.24", "mpi4py>=4.0", "h5py>=3.8"],
    extras_require={
        # The MPI library from the package registry (what mpi4py 4 pairs with); leave it
        # out on a cluster and build mpi4py against the site MPI instead (README).
        "mpich": ["mpich"],
        "test": ["pytest>=7", "pytest-mpi>=0.6", "pytest-timeout>=2.1", "scipy>=1.10", "ruff"],
        "plot": ["matplotlib>=3.6"],
        "gpu": ["cupy-cuda12x>=13"],
    },
    entry_points={"console_scripts": ["hpcopt=hpcopt.cli:entry_point"]},
    classifiers=["License :: OSI Approved :: BSD License", "Programming Language :: Python :: 3"],
)
