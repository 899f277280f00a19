"""The watchdog's wait loop and the layering rule that only hpcopt.comm imports mpi4py."""

from __future__ import annotations

import re

import pytest

from hpcopt.comm import watchdog
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(60)


class _Request:
    """A non-blocking request that completes after ``tests`` calls of ``Test``."""

    def __init__(self, tests: int | None) -> None:
        self.tests = tests
        self.calls = 0

    def Test(self) -> bool:  # mpi4py's spelling, which the loop calls
        self.calls += 1
        return self.tests is not None and self.calls >= self.tests


def test_a_completed_request_returns_true_without_polling() -> None:
    polls: list[None] = []
    assert watchdog.complete_by_deadline(_Request(1), 10.0, lambda: polls.append(None))
    assert polls == []


def test_a_stalled_request_polls_and_gives_up_at_the_deadline() -> None:
    polls: list[None] = []
    request = _Request(None)
    assert not watchdog.complete_by_deadline(request, 0.05, lambda: polls.append(None))
    assert len(polls) >= 2 and request.calls > len(polls)


def test_a_poll_that_raises_ends_the_wait() -> None:
    def poll() -> None:
        raise RuntimeError("rank 1 failed")

    with pytest.raises(RuntimeError, match="rank 1 failed"):
        watchdog.complete_by_deadline(_Request(None), 10.0, poll)


def test_only_the_comm_package_imports_mpi4py() -> None:
    package = REPO / "hpcopt"
    importing = re.compile(r"^\s*(from\s+mpi4py[\s.]|import\s+mpi4py)", re.MULTILINE)
    offenders = [
        str(path.relative_to(REPO))
        for path in package.rglob("*.py")
        if path.parent != package / "comm" and importing.search(path.read_text())
    ]
    assert offenders == []
