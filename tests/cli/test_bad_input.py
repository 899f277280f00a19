"""Bad input not covered by test_cli.py: one line on every rank, exit 2, nothing written.

In-process ``mpi`` tests through :func:`hpcopt.cli.main` (1 rank under ``pytest
--with-mpi``, 2 and 4 under ``mpiexec``): every rank checks its own stderr line, and
rank 0 checks that neither the run log nor a checkpoint was left behind.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import pytest

from hpcopt import cli
from hpcopt.comm import Communicator
from hpcopt.log import checkpoint

pytestmark = pytest.mark.timeout(60)

FAST = ["train", "--problem", "logistic", "--set", "problem.n=400", "--epochs", "1", "--quiet"]


def _idx_images(raw: bytes) -> Callable[[Path], list[str]]:
    def make(directory: Path) -> list[str]:
        (directory / "t10k-images-idx3-ubyte").write_bytes(raw)
        with gzip.open(directory / "t10k-labels-idx1-ubyte.gz", "wb") as handle:
            handle.write(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(10))
        return ["train", "--problem", "mnist", "--data-dir", str(directory), "--quiet"]

    return make


def _text(raw: bytes) -> Callable[[Path], list[str]]:
    def make(directory: Path) -> list[str]:
        (directory / "input.txt").write_bytes(raw)
        return ["train", "--problem", "tinyshakespeare", "--data-dir", str(directory), "--quiet"]

    return make


def _config(text: str) -> Callable[[Path], list[str]]:
    def make(directory: Path) -> list[str]:
        (directory / "run.toml").write_text(text)
        return [*FAST, "--config", str(directory / "run.toml")]

    return make


def _file(name: str, raw: bytes, *args: str) -> Callable[[Path], list[str]]:
    def make(directory: Path) -> list[str]:
        (directory / name).write_bytes(raw)
        return [*FAST, *(arg.replace("{dir}", str(directory)) for arg in args)]

    return make


def _args(*args: str) -> Callable[[Path], list[str]]:
    return lambda directory: [*FAST, *(arg.replace("{dir}", str(directory)) for arg in args)]


CASES = {
    "zero batch": (_args("--batch-size", "0"), "--batch-size must be positive, got 0"),
    "negative radius": (_args("--set", "radius=-0.5"), "apts-d: radius must be > 0"),
    "problem option type": (_args("--set", "problem.dim=ten"), "option dim='ten': expected int"),
    "problem option range": (_args("--set", "problem.n_val=0"), "n_val=0: must be >= 1"),
    "negative timeout": (_args("--collective-timeout", "-1"), "--collective-timeout must be >= 0"),
    "negative checkpoint interval": (_args("--checkpoint-every", "-2"), "--checkpoint-every must be >= 0"),
    "checkpoint without a path": (_args("--checkpoint-every", "5"), "needs --checkpoint PATH or --out"),
    "checkpoint under a file": (
        _args("--checkpoint", "/etc/hostname/run.ckpt", "--out", "{dir}/run.h5"),
        "directory /etc/hostname does not exist",
    ),
    "existing checkpoint": (
        _file("run.ckpt", b"old", "--checkpoint", "{dir}/run.ckpt", "--out", "{dir}/run.h5"),
        "already exists",
    ),
    "missing resume file": (_args("--resume", "{dir}/nothing.ckpt"), "nothing.ckpt does not exist"),
    "torn resume file": (_file("torn.ckpt", b"PK\x03\x04torn", "--resume", "{dir}/torn.ckpt"), "cannot be read"),
    "config value type": (_config('threads = "many"\n'), "option 'threads': expected int"),
    "config unknown key": (_config("epoch = 3\n"), "unknown train option 'epoch'"),
    "config bad table value": (_config('[apts-d]\nradius = "wide"\n'), "option 'radius': expected float"),
    "idx bad magic": (_idx_images(b"\x08\x03\x00\x00" + bytes(20)), "not an IDX file"),
    "idx truncated body": (
        _idx_images(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(500)),
        "truncated: header says 10x28x28",
    ),
    "text with NUL bytes": (_text(b"To be\x00 or not"), "not a text file"),
    "text not utf-8": (_text(b"To be \xff\xfe or not to be"), "is not UTF-8 text"),
    "empty text": (_text(b""), "is empty"),
}


# Cases whose point is the absence of --out.
WITHOUT_OUT = ("checkpoint without a path",)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_on_every_rank_and_leaves_nothing(
    case: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    comm = Communicator()
    directory = Path(comm.bcast_object(str(tmp_path)))
    make, message = CASES[case]
    argv = make(directory) if comm.is_root else []
    comm.barrier()  # rank 0's input files exist before anyone reads them
    argv = comm.bcast_object(argv)
    before = sorted(p.name for p in directory.iterdir())
    out = directory / "out.h5"
    if "--out" not in argv and case not in WITHOUT_OUT:
        argv = [*argv, "--out", str(out)]
    code = cli.main(argv)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("hpcopt: error:")]
    assert code == 2
    assert len(lines) == 1 and message in lines[0], lines
    comm.barrier()
    assert sorted(p.name for p in directory.iterdir()) == before  # no log, checkpoint or temporary file


@pytest.mark.mpi(min_size=2)
def test_more_ranks_than_samples(capfd: pytest.CaptureFixture[str]) -> None:
    comm = Communicator()
    code = cli.main([*FAST[:3], "--set", f"problem.n={comm.size - 1}", "--quiet"])
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("hpcopt: error:")]
    assert code == 2
    assert lines == [
        f"hpcopt: error: {comm.size} ranks but only {comm.size - 1} training samples: every rank needs at least "
        "one sample per batch; use fewer ranks or more data"
    ]


def test_checkpoint_default_path_is_beside_the_run_log() -> None:
    assert checkpoint.default_path("runs/a.h5") == "runs/a.h5.ckpt"
    assert checkpoint.default_path(None) is None
