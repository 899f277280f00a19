"""Every ```bash and ```python block of README.md and docs/ runs, shortened: a documented command that breaks fails CI.

**What runs.** Each fenced block tagged ``bash`` or ``python`` in ``README.md`` and
``docs/**/*.md`` is one test, named ``PAGE:LINE`` (the line of its opening fence). Blocks
of one page run in page order in one directory, so a block may use what an earlier block
of its page wrote (``hpcopt analyze runs/x.h5`` after the ``train`` that wrote it); a block
selected alone (``-k``) first runs the earlier blocks of its page. bash blocks run under
``set -euo pipefail`` with a trace (``+ command``) in the output; python blocks run with
the venv's ``python``.

**Where.** Each page gets a fresh directory that looks like a checkout after the quick
start (:func:`reader_state`): links to the repository's ``jobs/``, ``benchmarks/``,
``tests/`` and ``examples/``; copies of ``README.md`` and ``docs/`` (``--write-docs`` rewrites the copies);
``runs/`` holding ``runs/demo.h5`` (a shortened demo); ``sweeps/strong`` and
``sweeps/weak`` (a 1- and 2-rank sweep of ``logistic``) and ``net.json`` (a network for
``--model``), which the analysis examples read. The venv's ``bin/`` is first on ``PATH``
(``hpcopt``, ``python`` and ``mpiexec`` are the venv's), ``HPCOPT_DATA_DIR`` is the
datasets folder (:func:`tests.conftest.datasets_dir`), one thread per rank.

**Shortening.** :func:`shorten` rewrites a block before it runs; its docstring lists
every rule (fewer epochs and steps, at most 2 ranks, small batches, tiny benchmark
sizes, the real datasets folder). The docs themselves are never edited by the test.

**Markers.** An HTML comment on the line just before the fence, one of:

* ``<!-- docs-test: skip (REASON) -->``: not run; REASON is the skip reason. For what
  cannot run on a CI machine (a SLURM submission, a GPU, installing the project, the
  test suite itself).
* ``<!-- docs-test: needs TOOL -->``: skipped when TOOL is not on ``PATH``.
* ``<!-- docs-test: as-written -->``: not shortened (where the shortening would defeat
  the example, such as a fault injected at step 3). Marked slow.
* ``<!-- docs-test: in-repository -->``: run in the repository root, not the page's
  directory: for the Makefile's targets (the quick start is ``as-written,
  in-repository``; it writes only the git-ignored ``runs/demo.h5``).
* ``<!-- docs-test: exit N -->``: the block is documented to end with exit status N.

Directives other than ``skip`` combine with commas (``as-written, exit 3``). A block is
also skipped, with the reason, when it needs a dataset that is not there, or when its
commands are those of an earlier block (the skip names it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, datasets_dir

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LANGUAGES = ("bash", "python")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<directives>.*?)\s*-->\s*$")

# One block's own limit; the test's limit (pytest-timeout) adds the earlier blocks of its
# page that may run first, and a margin, so that the subprocess is killed and reported first.
BLOCK_TIMEOUT = 240.0
AS_WRITTEN_TIMEOUT = 420.0  # `make demo` stops at 170 s of training; installing may come first

# Shortening limits (see shorten()).
MAX_RANKS = 2
MAX_EPOCHS = 1
MAX_STEPS = 1
MAX_BATCH = 64
MAX_TIME_LIMIT = 10
# Extra arguments appended to a benchmark's command line (argparse keeps the last value
# of an option): the smallest sizes that still run every stage of the script once.
BENCHMARK_ARGUMENTS = {
    "comm_overhead.py": "--repeats 3 --sizes 1e3,1e4",
    "hvp_cost.py": "--repeats 1 --products 2 --models mlp",
    "heap_cost.py": "--model mlp --rows 200 --repeats 1 --products 2 --rounds 1",
    "mnist_apts.py": "--epochs 1 --runs adam.P2.small.lr1e-3",
    "apts_scaling_accuracy.py": (
        "--epochs 1 --batch 8000 --model mlp --ranks 2 --variants average --radii '' --adam-lrs ''"
    ),
    "large_batch.py": "--epochs 1 --batches 8000 --runs hf-cg",
    "neumann_sharpness.py": "--epochs 1 --rows 64 --iterations 2 --lrs 0.2 --model mlp",
    "neumann_rms.py": "--epochs 1 --batch 15000 --rms-lrs 0.01 --model mlp",
    "krylov_rate.py": "--iterations 2 --batch 200",
    "pinn_study.py": "--budget 2 --problems poisson2d --methods apts-d",
    "lm_study.py": "--budget 2 --runs adam.lr3e-3 --train-windows 256",
    "checkpoint_cost.py": "--steps 1 --models mlp",
    "kernels.py": "--sizes 1e4 --repeats 2",
    "scaling.py": "--steps 1 --model mlp",
    "dataset_overhead.py": "--limit 2000 --repeats 1 --epochs 1 --models mlp",
}
# Which blocks need which dataset: (file that shows it is there, what in a block uses it).
DATASETS = {
    "mnist": (
        "t10k-labels-idx1-ubyte*",
        re.compile(r"mnist|apts_scaling_accuracy|krylov_rate|checkpoint_cost|large_batch|scaling\.py"),
    ),
    "mnist-full": ("train-labels-idx1-ubyte*", re.compile(r"mnist-full")),
    "tinyshakespeare": ("input.txt", re.compile(r"tinyshakespeare|lm_study")),
}


@dataclass(frozen=True)
class Block:
    """One fenced example: where it is, its language, its text and the marker above it."""

    page: str  # relative to the repository, e.g. docs/cli.md
    line: int  # 1-based line of the opening fence
    lang: str
    source: str
    marker: str | None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass(frozen=True)
class Directives:
    """The marker's directives, parsed."""

    skip: str | None = None
    needs: tuple[str, ...] = ()
    as_written: bool = False
    in_repository: bool = False
    exit_status: int = 0


def parse_directives(marker: str | None) -> Directives:
    """The directives of a ``docs-test:`` marker; ``ValueError`` for one that is not known."""
    if marker is None:
        return Directives()
    skip = re.fullmatch(r"skip\s*\((?P<reason>.+)\)", marker)
    if skip:
        return Directives(skip=skip["reason"].strip())
    needs: list[str] = []
    as_written, in_repository, exit_status = False, False, 0
    for directive in (part.strip() for part in marker.split(",")):
        if directive == "as-written":
            as_written = True
        elif directive == "in-repository":
            in_repository = True
        elif match := re.fullmatch(r"needs\s+(?P<tool>[\w.+-]+)", directive):
            needs.append(match["tool"])
        elif match := re.fullmatch(r"exit\s+(?P<status>\d+)", directive):
            exit_status = int(match["status"])
        else:
            known = "skip (REASON), needs TOOL, as-written, in-repository, exit N"
            raise ValueError(f"unknown docs-test directive {directive!r} (known: {known})")
    return Directives(needs=tuple(needs), as_written=as_written, in_repository=in_repository, exit_status=exit_status)


def parse_page(path: Path) -> tuple[list[Block], list[int]]:
    """The bash and python blocks of a markdown page, and the lines of markers that sit on no such block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = path.relative_to(REPO).as_posix()
    blocks: list[Block] = []
    markers: set[int] = set()  # marker lines outside fences (inside one, a marker is an example)
    number = 0
    while number < len(lines):
        opening = FENCE.match(lines[number])
        if opening is None:
            if MARKER.match(lines[number]):
                markers.add(number)
            number += 1
            continue
        end = number + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if opening["lang"] in LANGUAGES:
            indent = opening["indent"]
            body = [line[len(indent) :] if line.startswith(indent) else line for line in lines[number + 1 : end]]
            marker = MARKER.match(lines[number - 1]) if number > 0 else None
            if marker:
                markers.discard(number - 1)
            source = "\n".join(body) + "\n"
            blocks.append(Block(page, number + 1, opening["lang"], source, marker["directives"] if marker else None))
        number = end + 1
    return blocks, sorted(line + 1 for line in markers)


# ---------------------------------------------------------------------------------------
# Shortening


def _outside_quotes(text: str) -> Iterator[tuple[int, str]]:
    """``(index, character)`` of each character of a shell line that is not inside quotes."""
    quote = ""
    for index, char in enumerate(text):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        else:
            yield index, char


def _split_comment(line: str) -> tuple[str, str]:
    """``(code, comment)`` of a shell line; the comment starts at an unquoted ``#`` after a blank."""
    for index, char in _outside_quotes(line):
        if char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index], line[index:]
    return line, ""


def _split_commands(code: str) -> list[tuple[str, str]]:
    """``(command, separator after it)`` for the commands of a line joined by ``&&``, ``||``, ``;`` or ``|``."""
    parts: list[tuple[str, str]] = []
    start = 0
    skip_to = -1
    for index, char in _outside_quotes(code):
        if index < skip_to:
            continue
        if char in "&|;":
            double = code[index : index + 2] in ("&&", "||")
            if char == "&" and not double:
                continue  # a background job or a redirection: not a separator used in the docs
            separator = code[index : index + 2] if double else char
            parts.append((code[start:index], separator))
            start = skip_to = index + len(separator)
    parts.append((code[start:], ""))
    return parts


def _option(flag: str) -> re.Pattern[str]:
    """``FLAG VALUE`` or ``FLAG=VALUE`` as a whole word."""
    return re.compile(rf"(?<!\S)(?P<flag>{re.escape(flag)})(?P<sep>=|\s+)(?P<value>[^\s;&|]+)")


def _cap(command: str, flag: str, limit: float, *, add: bool = False) -> str:
    """``FLAG N`` with N capped at ``limit``; with ``add``, ``FLAG limit`` appended when the flag is absent."""

    def capped(match: re.Match[str]) -> str:
        try:
            value = float(match["value"])
        except ValueError:
            return match[0]
        return match[0] if value <= limit else f"{match['flag']}{match['sep']}{limit:g}"

    pattern = _option(flag)
    if pattern.search(command):
        return pattern.sub(capped, command)
    return f"{command.rstrip()} {flag} {limit:g} " if add else command


def _shorten_train(arguments: str) -> str:
    """The caps for the arguments of ``hpcopt train``."""
    # A resumed run counts its steps from the start of the original run: one more step to do.
    steps = MAX_STEPS + 1 if _option("--resume").search(arguments) else MAX_STEPS
    arguments = _cap(arguments, "--epochs", MAX_EPOCHS)
    arguments = _cap(arguments, "--max-steps", steps, add=True)
    arguments = _cap(arguments, "--batch-size", MAX_BATCH)
    return _cap(arguments, "--time-limit", MAX_TIME_LIMIT)


def _ranks_list(match: re.Match[str]) -> str:
    kept = [rank for rank in match["value"].split(",") if rank.isdigit() and int(rank) <= MAX_RANKS]
    return f"{match['flag']}{match['sep']}{','.join(kept or ['1'])}"


def _shorten_command(command: str, data_dir: Path) -> str | None:
    """One simple command, shortened (see :func:`shorten`); ``None`` drops it."""
    if re.fullmatch(r"\s*(source|\.)\s+\S*bin/activate\s*", command):
        return None
    command = command.replace("../shared/datasets", str(data_dir))
    command = re.sub(r"^(\s*)srun(?:\s+-[^\s=]+(?:=\S+|\s+\d+)?)*", rf"\1mpiexec -n {MAX_RANKS}", command)
    command = re.sub(
        r"\b(?P<launcher>mpiexec|mpirun)(?P<sep>\s+-np?\s+)(?P<ranks>\d+)",
        lambda match: f"{match['launcher']}{match['sep']}{min(int(match['ranks']), MAX_RANKS)}",
        command,
    )
    if re.search(r"\bhpcopt\s+train\b", command):
        command = _shorten_train(command)
    elif re.search(r"\bhpcopt\s+jobs\s+local\b", command):
        sweep, dashes, train = command.partition(" -- ")
        sweep = _option("--ranks").sub(_ranks_list, sweep)
        command = f"{sweep}{dashes}{_shorten_train(train)}" if dashes else _shorten_train(f"{sweep} --")
    elif re.search(r"\bhpcopt\s+study\s+robustness\b", command):
        study, dashes, train = command.partition(" -- ")
        study = re.sub(r"(--optimizers[ =])([\w-]+)\S*", r"\1\2", _cap(study, "--ranks", MAX_RANKS))
        first = re.search(r"--optimizers[ =]([\w-]+)", study)
        study = f"{study.rstrip()} --grid {first[1]}=0.01,0.1" if first else study
        command = f"{study}{dashes}{_shorten_train(train)}" if dashes else study
    command = _cap(command, "--calibrate-ranks", MAX_RANKS)
    for script, arguments in BENCHMARK_ARGUMENTS.items():
        if re.search(rf"\bbenchmarks/{re.escape(script)}(?!\S)", command):
            command = f"{command.rstrip()} {arguments} "
    return command


def shorten(source: str, lang: str, data_dir: Path) -> str:
    """A block's text as the test runs it: shorter, on at most 2 ranks, with the real data.

    Applied to every block without the ``as-written`` marker; a reader's copy of the
    command and what runs differ only by these rules.

    * ``../shared/datasets`` becomes ``data_dir`` (bash and python).
    * bash, each command of a line (``&&``, ``||``, ``;`` and ``|`` separate commands;
      ``\\`` continuations are joined first, comments kept):

      - ``source .venv/bin/activate`` is dropped: the venv is already first on ``PATH``.
      - ``srun [OPTIONS]`` becomes ``mpiexec -n 2`` (SLURM's launcher; what follows runs).
      - ``mpiexec -n N`` / ``mpirun -np N``: at most 2 ranks.
      - ``hpcopt train``: ``--epochs`` at most 1, ``--max-steps`` at most 1 (added when
        absent; 2 with ``--resume``, whose steps count from the start of the original
        run), ``--batch-size`` at most 64, ``--time-limit`` at most 10.
      - ``hpcopt jobs local``: ``--ranks`` keeps the counts up to 2; the train arguments
        after ``--`` are capped as for ``hpcopt train``.
      - ``hpcopt study robustness``: ``--ranks`` at most 2, the first optimizer only, at
        two knob values (``--grid NAME=0.01,0.1``); train arguments as for ``hpcopt train``.
      - ``hpcopt analyze --calibrate-ranks N``: at most 2.
      - ``benchmarks/NAME.py``: ``BENCHMARK_ARGUMENTS[NAME]`` appended (tiny sizes,
        one run of a study).
    """
    source = source.replace("../shared/datasets", str(data_dir))
    if lang != "bash":
        return source
    logical: list[str] = []
    pending = ""
    for line in source.splitlines():
        if line.endswith("\\"):
            pending += (line[:-1].strip() if pending else line[:-1].rstrip()) + " "
            continue
        logical.append(pending + line.lstrip() if pending else line)
        pending = ""
    if pending:
        logical.append(pending)
    out: list[str] = []
    for line in logical:
        code, comment = _split_comment(line)
        if not code.strip():
            out.append(line)
            continue
        kept: list[tuple[str, str]] = []
        for command, separator in _split_commands(code):
            shortened = _shorten_command(command, data_dir)
            if shortened is not None:
                kept.append((shortened, separator))
            elif kept and not separator:
                kept[-1] = (kept[-1][0], "")  # the dropped command was the last: no dangling `&&`
        rewritten = "".join(f"{command}{separator}" for command, separator in kept).strip()
        if rewritten:
            out.append(f"{rewritten}  {comment}".rstrip())
    return "\n".join(out) + "\n"


def _normalised(block: Block, data_dir: Path) -> str:
    """A block's commands without comments or layout: blocks equal in this run the same thing."""
    text = shorten(block.source, block.lang, data_dir)
    if block.lang == "bash":
        text = "\n".join(_split_comment(line)[0] for line in text.splitlines())
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------
# Collection


def collect() -> tuple[list[Block], dict[Block, str], list[str]]:
    """Every block; the earlier block each duplicate repeats; markers on no block (``PAGE:LINE``)."""
    blocks: list[Block] = []
    stray: list[str] = []
    for path in PAGES:
        page_blocks, page_stray = parse_page(path)
        blocks += page_blocks
        stray += [f"{path.relative_to(REPO).as_posix()}:{line}" for line in page_stray]
    first: dict[str, Block] = {}
    duplicates: dict[Block, str] = {}
    for block in blocks:
        try:
            directives = parse_directives(block.marker)
        except ValueError:
            continue  # the test of this block reports it
        if directives.skip or directives.needs or directives.exit_status:
            continue
        key = _normalised(block, datasets_dir())
        if key in first:
            duplicates[block] = first[key].id
        else:
            first[key] = block
    return blocks, duplicates, stray


BLOCKS, DUPLICATES, STRAY_MARKERS = collect()


def skip_reason(block: Block) -> str | None:
    """Why ``block`` is not run here, or ``None`` (``ValueError`` for a bad marker)."""
    directives = parse_directives(block.marker)
    if directives.skip:
        return directives.skip
    missing = [tool for tool in directives.needs if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)}, not on PATH"
    if block in DUPLICATES:
        return f"the same commands as {DUPLICATES[block]}, which runs them"
    if not directives.as_written:
        text = shorten(block.source, block.lang, datasets_dir())
        for name, (probe, used) in DATASETS.items():
            if used.search(text) and not any((datasets_dir() / name).glob(probe)):
                return f"needs the {name} dataset in {datasets_dir() / name} (set HPCOPT_DATA_DIR)"
    return None


# ---------------------------------------------------------------------------------------
# Running


@dataclass
class Outcome:
    """How one block ran."""

    block: Block
    script: str
    status: int | None  # None: killed at the timeout
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == parse_directives(self.block.marker).exit_status


def environment() -> dict[str, str]:
    """The environment of every block: the venv first on PATH, the datasets, one thread per rank."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(BIN.parent),
        "HPCOPT_DATA_DIR": str(datasets_dir()),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "MPLBACKEND": "Agg",
        "PS4": "+ ",
    }


def execute(block: Block, cwd: Path) -> Outcome:
    """Run one block in ``cwd`` (shortened unless marked ``as-written``), killing its process group at the timeout."""
    directives = parse_directives(block.marker)
    as_written = directives.as_written
    script = block.source if as_written else shorten(block.source, block.lang, datasets_dir())
    if block.lang == "bash":
        command = ["bash", "-c", f"set -euo pipefail -x\n{script}"]
    else:
        command = [str(BIN / "python"), "-c", script]
    timeout = AS_WRITTEN_TIMEOUT if as_written else BLOCK_TIMEOUT
    start = time.perf_counter()
    # A session of its own: at the timeout the whole tree (mpiexec and its ranks) is killed.
    process = subprocess.Popen(
        command,
        cwd=REPO if directives.in_repository else cwd,
        env=environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        status: int | None = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        output += f"\n[killed after {timeout:.0f} s]"
        status = None
    return Outcome(block, script, status, output, time.perf_counter() - start)


def reader_state(root: Path) -> Path:
    """A directory as a reader's checkout is after the quick start; every page's directory starts as a copy.

    Made once per test session: links to jobs/, benchmarks/, tests/ and examples/, copies of the
    pages, ``runs/demo.h5`` from a 1-step demo, ``sweeps/strong`` and ``sweeps/weak``
    (logistic at 1 and 2 ranks) and ``net.json``.
    """
    from hpcopt.analysis.perfmodel import Network

    state = root / "checkout"
    state.mkdir()
    for name in ("jobs", "benchmarks", "tests", "examples"):
        (state / name).symlink_to(REPO / name, target_is_directory=True)
    shutil.copy2(REPO / "README.md", state / "README.md")
    shutil.copytree(REPO / "docs", state / "docs")
    (state / "runs").mkdir()
    Network(2e-6, 25e9).to_json(state / "net.json")
    sweep = "--problem logistic --optimizer sgd --ranks 1,2 -- --epochs 1 --set problem.n=200"
    setup = (
        "hpcopt train --config jobs/poisson2d_demo.toml --max-steps 1 --out runs/demo.h5 --quiet\n"
        f"hpcopt jobs local --study strong --batch-size 100 --outdir sweeps/strong {sweep}\n"
        f"hpcopt jobs local --study weak --batch-size 50 --outdir sweeps/weak {sweep}\n"
    )
    made = subprocess.run(
        ["bash", "-c", f"set -euo pipefail -x\n{setup}"],
        cwd=state,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=BLOCK_TIMEOUT,
        check=False,
    )
    if made.returncode != 0:
        pytest.fail(f"could not prepare the reader's checkout:\n{made.stdout[-6000:]}", pytrace=False)
    return state


@dataclass
class Pages:
    """One directory per page, made on first use, and the outcome of every block run so far."""

    root: Path
    state: Callable[[], Path]
    directories: dict[str, Path] = field(default_factory=dict)
    outcomes: dict[Block, Outcome] = field(default_factory=dict)

    def directory(self, page: str) -> Path:
        if page not in self.directories:
            path = self.root / re.sub(r"[^\w.-]", "_", page)
            shutil.copytree(self.state(), path, symlinks=True)
            self.directories[page] = path
        return self.directories[page]

    def run(self, block: Block) -> Outcome:
        """Run ``block`` after the earlier runnable blocks of its page that have not run yet."""
        for earlier in BLOCKS:
            if earlier.page != block.page or earlier.line >= block.line or earlier in self.outcomes:
                continue
            try:
                if skip_reason(earlier) is None:
                    self.outcomes[earlier] = execute(earlier, self.directory(earlier.page))
            except ValueError:
                continue
        outcome = execute(block, self.directory(block.page))
        self.outcomes[block] = outcome
        return outcome


@pytest.fixture(scope="session")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Pages:
    root = tmp_path_factory.mktemp("docs-examples")
    made: list[Path] = []

    def state() -> Path:
        if not made:
            made.append(reader_state(root))
        return made[0]

    return Pages(root, state)


def _report(outcome: Outcome, earlier_failures: list[str]) -> str:
    numbered = "\n".join(f"{index:4}  {line}" for index, line in enumerate(outcome.script.splitlines(), 1))
    expected = parse_directives(outcome.block.marker).exit_status
    status = "killed at the timeout" if outcome.status is None else f"exit status {outcome.status}"
    lines = [
        f"{outcome.block.id}: {status} (documented: {expected}) after {outcome.seconds:.0f} s",
        f"--- {outcome.block.lang}, as run ---",
        numbered,
        "--- output (last 6000 characters) ---",
        outcome.output[-6000:],
    ]
    if earlier_failures:
        lines.append(f"(earlier blocks of this page failed too: {', '.join(earlier_failures)})")
    return "\n".join(lines)


def _as_written(block: Block) -> bool:
    try:
        return parse_directives(block.marker).as_written
    except ValueError:
        return False


def _timeout(block: Block) -> float:
    """pytest-timeout's limit: the block, the earlier blocks of its page it may run first, and the set-up."""
    earlier = sum(1 for other in BLOCKS if other.page == block.page and other.line < block.line)
    own = AS_WRITTEN_TIMEOUT if _as_written(block) else BLOCK_TIMEOUT
    return own + earlier * BLOCK_TIMEOUT + BLOCK_TIMEOUT + 60


def _parameters() -> list[object]:
    parameters: list[object] = []
    for block in BLOCKS:
        marks = [pytest.mark.timeout(_timeout(block))]
        if _as_written(block):
            marks.append(pytest.mark.slow)
        parameters.append(pytest.param(block, id=block.id, marks=marks))
    return parameters


@pytest.mark.parametrize("block", _parameters())
def test_docs_example(block: Block, pages: Pages) -> None:
    try:
        reason = skip_reason(block)
    except ValueError as error:
        pytest.fail(f"{block.id}: {error}", pytrace=False)
    if reason is not None:
        pytest.skip(reason)
    outcome = pages.run(block)
    if not outcome.ok:
        earlier = [
            other.block.id for other in pages.outcomes.values() if other.block.page == block.page and not other.ok
        ]
        pytest.fail(_report(outcome, [name for name in earlier if name != block.id]), pytrace=False)


def test_markers_sit_on_a_block() -> None:
    """A ``docs-test`` marker must be the line just before a bash or python fence, or it marks nothing."""
    assert not STRAY_MARKERS, f"docs-test markers not directly above a ```bash or ```python fence: {STRAY_MARKERS}"


@pytest.mark.parametrize(
    ("written", "run"),
    [
        (
            "mpiexec -n 4 python -m mpi4py -m hpcopt train --problem mnist --data-dir ../shared/datasets/mnist \\\n"
            "    --batch-size 2000 --epochs 10 --out runs/mnist.h5",
            "mpiexec -n 2 python -m mpi4py -m hpcopt train --problem mnist --data-dir DATA/mnist "
            "--batch-size 64 --epochs 1 --out runs/mnist.h5 --max-steps 1",
        ),
        ("source .venv/bin/activate && mkdir -p runs", "mkdir -p runs"),
        (
            "hpcopt train --max-steps 20 --time-limit 120   # a comment",
            "hpcopt train --max-steps 1 --time-limit 10  # a comment",
        ),
        (
            "srun --mpi=pmi2 -n 8 python -m mpi4py -m hpcopt calibrate --json samples.json",
            "mpiexec -n 2 python -m mpi4py -m hpcopt calibrate --json samples.json",
        ),
        (
            "hpcopt jobs local --study weak --ranks 1,2,4,8 --batch-size 100 --outdir s -- --epochs 2",
            "hpcopt jobs local --study weak --ranks 1,2 --batch-size 100 --outdir s -- --epochs 1 --max-steps 1",
        ),
        ("hpcopt train --resume r.ckpt", "hpcopt train --resume r.ckpt --max-steps 2"),
        ("python benchmarks/kernels.py", "python benchmarks/kernels.py --sizes 1e4 --repeats 2"),
        ('python -c "import h5py; print(1)"', 'python -c "import h5py; print(1)"'),
    ],
)
def test_shorten(written: str, run: str) -> None:
    assert shorten(written, "bash", Path("DATA")) == run + "\n"
