"""The run log's ``git_sha`` and ``git_status``: which commit ran, and whether its code was changed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import h5py
import pytest

import hpcopt
from hpcopt.log.provenance import MAX_NAMED, source_revision

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(root: Path, *args: str) -> str:
    command = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A git checkout with a committed ``hpcopt`` package and ``kernels`` folder, and a notes file."""
    root = tmp_path / "my checkout"  # a space in the path, as on many laptops
    (root / "hpcopt").mkdir(parents=True)
    (root / "kernels").mkdir()
    (root / "hpcopt" / "__init__.py").write_text("x = 1\n")
    (root / "kernels" / "a.cu").write_text("// kernel\n")
    (root / "notes.txt").write_text("notes\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "first")
    return root


def test_a_clean_checkout_gives_its_commit_and_clean(checkout: Path) -> None:
    revision = source_revision(checkout)
    assert revision.sha == git(checkout, "rev-parse", "HEAD") and len(revision.sha) == 40
    assert revision.status == "clean"
    (checkout / "notes.txt").write_text("other notes\n")  # outside the code a run executes
    assert source_revision(checkout).status == "clean"


def test_changed_and_new_code_files_are_named(checkout: Path) -> None:
    (checkout / "hpcopt" / "__init__.py").write_text("x = 2\n")
    (checkout / "kernels" / "b.cu").write_text("// new kernel\n")
    revision = source_revision(checkout)
    assert revision.sha == git(checkout, "rev-parse", "HEAD")  # the commit, which is not what ran
    assert revision.status == "modified: hpcopt/__init__.py, kernels/b.cu"


def test_a_long_list_is_cut_and_counted(checkout: Path) -> None:
    for index in range(MAX_NAMED + 3):
        (checkout / "hpcopt" / f"m{index:02d}.py").write_text("\n")
    status = source_revision(checkout).status
    assert status.startswith("modified: hpcopt/m00.py, ") and status.endswith(" and 3 more")
    assert status.count(", ") == MAX_NAMED - 1


def test_a_copy_inside_another_checkout_is_not_that_checkouts_code(checkout: Path) -> None:
    # an installed package in a virtual environment that lies in a checkout: .venv/lib/pythonX/site-packages
    site = checkout / "venv" / "lib"
    site.mkdir(parents=True)
    assert source_revision(site) == source_revision(checkout.parent / "nowhere")
    assert source_revision(site).sha == "" and source_revision(site).status == ""


def test_the_run_log_records_the_commit_and_status(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    hpcopt.train("quadratic", optimizer="sgd", epochs=1, out=out, quiet=True)
    with h5py.File(out, "r") as log:
        sha, status = log.attrs["git_sha"], log.attrs["git_status"]
    expected = source_revision()
    assert (sha, status) == (expected.sha, expected.status)
    assert status in ("", "clean") or status.startswith("modified: ")
