"""``hpcopt analyze`` says when the runs of a table did not all run the same code."""

from __future__ import annotations

from hpcopt.analysis.provenance import provenance_note
from hpcopt.analysis.tables import Run

SHA_A, SHA_B = "a" * 40, "b" * 40
SAME = {"torch_version": "2.13.0+cpu", "mpi_library_version": "MPICH Version:      5.0.2\nMPICH Release date: x"}


def run(path: str, **attributes: object) -> Run:
    return Run(path, {**SAME, "git_sha": SHA_A, "git_status": "clean", **attributes})


def test_runs_on_one_clean_commit_get_no_note() -> None:
    assert provenance_note([run("runs/a.h5"), run("runs/b.h5")]) == ""


def test_commits_changed_code_and_versions_are_named() -> None:
    runs = [
        run("runs/a.h5"),
        run("runs/b.h5", git_sha=SHA_B),
        run("runs/c.h5", git_sha=SHA_B, git_status="modified: hpcopt/optimizers/nlcg.py"),
        run("runs/d.h5", torch_version="2.12.0+cpu"),
    ]
    note = provenance_note(runs)
    assert note.startswith("\nthe runs did not all run the same code:\n")
    assert "  2 commits: aaaaaaa (2 runs), bbbbbbb (2 runs)\n" in note
    assert "  uncommitted changes to the code (git_status) in 1 run: c.h5\n" in note
    assert "  2 torch versions: 2.13.0+cpu (3 runs), 2.12.0+cpu (1 run)\n" in note
    assert "MPI" not in note  # the same MPI, told apart by the first line of its version only


def test_logs_without_provenance_count_as_unknown_and_a_single_modified_run_is_named() -> None:
    older = Run("runs/old.h5", {**SAME})  # a log from before git_sha was recorded
    assert "2 commits: aaaaaaa (1 run), unknown (1 run)" in provenance_note([run("runs/new.h5"), older])
    many = [run(f"runs/r{i}.h5", git_status="modified: hpcopt/x.py") for i in range(7)]
    assert "in 7 runs: r0.h5, r1.h5, r2.h5, r3.h5, r4.h5 and 2 more" in provenance_note(many)
    assert "in 1 run: only.h5" in provenance_note([run("runs/only.h5", git_status="modified: kernels/a.cu")])
