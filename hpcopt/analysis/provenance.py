"""Whether the runs of one table ran the same code: a note under ``hpcopt analyze``'s summary.

Two runs with the same options and seed give the same numbers only on the same code, torch
and MPI. A table that mixes commits, a checkout with uncommitted changes (the run log's
``git_status``, :mod:`hpcopt.log.provenance`) or library versions compares more than the
options, so the summary says so, naming the runs; runs on one clean commit get no note.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from hpcopt.analysis.tables import Run, display_names

#: run-log attribute → what the note calls it
VERSIONS = {"torch_version": "torch", "mpi_library_version": "MPI"}
MAX_NAMED = 5  # runs named in one line; the rest are counted


def provenance_note(runs: Sequence[Run]) -> str:
    """Lines that say where the runs' code or libraries differ; ``""`` where they do not."""
    names = display_names([run.path for run in runs])
    lines = []
    commits = Counter(str(run.attributes.get("git_sha", ""))[:7] or "unknown" for run in runs)
    if len(commits) > 1:
        lines.append(f"{len(commits)} commits: {_counted(commits)}")
    modified = [name for run, name in zip(runs, names, strict=True) if _modified(run)]
    if modified:
        lines.append(f"uncommitted changes to the code (git_status) in {_runs(len(modified))}: {_listed(modified)}")
    for attribute, label in VERSIONS.items():
        # the first line of a version string names it (MPICH's runs to a screen of build options)
        versions = Counter(str(run.attributes.get(attribute, "")).strip().split("\n")[0] or "unknown" for run in runs)
        if len(versions) > 1:
            lines.append(f"{len(versions)} {label} versions: {_counted(versions)}")
    if not lines:
        return ""
    return "\nthe runs did not all run the same code:\n" + "".join(f"  {line}\n" for line in lines)


def _modified(run: Run) -> bool:
    return str(run.attributes.get("git_status", "")).startswith("modified")


def _counted(counts: Counter[str]) -> str:
    return ", ".join(f"{value} ({_runs(n)})" for value, n in counts.most_common())


def _runs(count: int) -> str:
    return f"{count} run" if count == 1 else f"{count} runs"


def _listed(names: list[str]) -> str:
    # hpcopt.log.provenance.listed's twin: the analysis layer imports nothing but errors.
    more = f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else ""
    return ", ".join(names[:MAX_NAMED]) + more
