"""Which source code a run ran: the git commit of hpcopt's checkout and whether its code differs from it.

A commit alone does not say which code ran: a run started while ``hpcopt/`` had uncommitted
changes would carry the commit's hash and results that the commit does not give. So the run
log records, beside ``git_sha``, ``git_status``: ``clean``, or ``modified: `` and the changed
or untracked files under ``hpcopt/`` and ``kernels/`` (the code a run executes; the options
of a run are in its ``config_json``).  Outside a git checkout of hpcopt (an installed wheel)
both are empty: a copy in ``site-packages`` of a virtual environment that happens to lie in
some checkout is not that checkout's code.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

#: The checkout of an editable install: the folder that holds the ``hpcopt`` package.
SOURCE_ROOT = Path(__file__).resolve().parents[2]
#: The folders whose state the status reports.
CODE_FOLDERS = ("hpcopt", "kernels")
MAX_NAMED = 20  # files named in a status; the rest are counted


@dataclass(frozen=True)
class SourceRevision:
    sha: str  #: the commit checked out, "" outside a checkout
    status: str  #: "clean", "modified: FILE, …", or "" outside a checkout


def source_revision(root: Path = SOURCE_ROOT) -> SourceRevision:
    """The commit and state of the checkout at ``root``; empty strings where ``root`` is not one."""
    # one call for both: the checkout's top folder and its commit (fails without a commit)
    revision = (_git(root, "rev-parse", "--show-toplevel", "HEAD") or "").splitlines()
    if len(revision) != 2 or Path(revision[0]).resolve() != root.resolve():
        return SourceRevision("", "")
    sha = revision[1]
    changes = _git(root, "status", "--porcelain", "--untracked-files=all", "--", *CODE_FOLDERS)
    if changes is None:
        return SourceRevision(sha, "")
    # porcelain lines are "XY PATH" (a rename: "XY OLD -> NEW"): the path starts at column 3
    names = [line[3:] for line in changes.splitlines() if line.strip()]
    if not names:
        return SourceRevision(sha, "clean")
    return SourceRevision(sha, "modified: " + listed(names, MAX_NAMED))


def listed(names: list[str], limit: int) -> str:
    """``a, b, c`` — the first ``limit`` names, and ``and N more`` for the rest."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return out.stdout if out.returncode == 0 else None
