"""``hpcopt options``: every option of an optimizer, a problem or ``train``, and the docs tables of them.

Owns the registry of named option sets (each optimizer's config dataclass, each
problem's options dataclass, :class:`~hpcopt.training.config.TrainConfig`), their
rendering as a text or markdown table (type, default and the one-line meaning
from the class docstrings, see :func:`hpcopt.config.field_docs`), and the
regeneration of the marker blocks in markdown files::

    <!-- options: apts-d -->
    (generated: never edit by hand)
    <!-- /options -->

It may import the standard library, :mod:`hpcopt.config`, :mod:`hpcopt.errors`,
:mod:`hpcopt.cli.flags`, :mod:`hpcopt.training.config` and, inside functions only
(they import torch), :mod:`hpcopt.optimizers` and :mod:`hpcopt.problems`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcopt.cli.flags import flag_name
from hpcopt.config import field_docs, flag_of, type_name
from hpcopt.errors import ConfigError
from hpcopt.training.config import TrainConfig

BLOCK_START = re.compile(r"^<!-- options: (?P<name>\S+) -->\s*$")
BLOCK_END = re.compile(r"^<!-- /options -->\s*$")
FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})")


@dataclass(frozen=True)
class OptionSet:
    """A named options dataclass and how a user sets its options.

    Attributes:
        name: what ``hpcopt options NAME`` and the docs markers call it.
        kind: ``optimizer``, ``problem`` or ``train``.
        cls: the dataclass.
    """

    name: str
    kind: str
    cls: type

    def how_to_set(self) -> str:
        """One line on where these options go (command line and ``--config`` file)."""
        if self.kind == "optimizer":
            return f"--optimizer {self.name}: --set KEY=VALUE, or the [{self.name}] table of a --config file"
        if self.kind == "problem":
            return f"--problem {self.name}: --set problem.KEY=VALUE, or the [{self.name}] table of a --config file"
        return "hpcopt train: the flags below, or top-level keys of a --config file"


@dataclass(frozen=True)
class OptionRow:
    """One option of an :class:`OptionSet`, ready to print.

    Attributes:
        name: the field name (the ``--set`` and TOML key).
        flag: the command-line flag (``--batch-size``), or ``None`` when there is none.
        type: ``int``, ``float``, ``str``, ``bool`` or e.g. ``int | None``.
        default: the default, spelled as ``--set`` accepts it.
        doc: the one-line meaning ("" when the docstrings do not document the field).
    """

    name: str
    flag: str | None
    type: str
    default: str
    doc: str


def option_sets() -> dict[str, OptionSet]:
    """Every named option set: the optimizers, then the problems, then ``train``."""
    from hpcopt.optimizers import OPTIMIZERS
    from hpcopt.problems import PROBLEM_OPTIONS

    sets = {name: OptionSet(name, "optimizer", cls.config_class) for name, cls in OPTIMIZERS.items()}
    sets.update({name: OptionSet(name, "problem", cls) for name, cls in PROBLEM_OPTIONS.items()})
    sets["train"] = OptionSet("train", "train", TrainConfig)
    return sets


def lookup(name: str) -> OptionSet:
    """The option set ``name``.

    Raises:
        ConfigError: no optimizer, problem or ``train`` has that name.
    """
    sets = option_sets()
    if name not in sets:
        raise ConfigError(f"unknown option set '{name}' (choose from {', '.join(sets)})")
    return sets[name]


def format_default(field: dataclasses.Field[Any]) -> str:
    """The default of ``field`` as ``--set`` spells it: ``true``/``false`` for booleans, ``None`` for unset."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and len(repr(value)) > 10:
        return f"{value:.6g}"  # 2/3 reads better as 0.666667 than with all 17 digits
    return str(value) if isinstance(value, str) else repr(value)


def rows(cls: type) -> list[OptionRow]:
    """One :class:`OptionRow` per field of dataclass ``cls``, in field order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    return [
        OptionRow(
            name=field.name,
            flag=flag_name(field.name) if flag_of(field) is not None else None,
            type=type_name(hints[field.name]),
            default=format_default(field),
            doc=docs.get(field.name, ""),
        )
        for field in dataclasses.fields(cls)
    ]


def plain(doc: str) -> str:
    """Docstring markup as markdown: ````x```` → ```x```, ``:class:`~a.b.C``` → ``C``."""
    doc = re.sub(r":[a-z]+:`~[\w.]*?(\w+)`", r"`\1`", doc)  # ~ asks for the last component only
    doc = re.sub(r":[a-z]+:`([\w.]+)`", r"`\1`", doc)
    return doc.replace("``", "`")


def train_defaults(option_set: OptionSet) -> list[tuple[str, str]]:
    """``(option, default)`` of a problem's defaults for ``hpcopt train``; ``[]`` for other option sets."""
    if option_set.kind != "problem":
        return []
    defaults = getattr(option_set.cls, "train_defaults", None)
    return [] if defaults is None else list(defaults.rows())


def train_defaults_title(option_set: OptionSet) -> str:
    """The heading of the defaults section: what they are for and when they apply."""
    return (
        f"defaults for train (hpcopt train --problem {option_set.name}; each applies only when neither "
        "a flag, the --config file nor --set gives the option; time_limit only when epochs is not given "
        "either; optimizer options only to that optimizer)"
    )


def render_text(option_set: OptionSet) -> str:
    """Aligned columns: name (and flag), type, default, meaning; for a problem, then its defaults for train."""
    table = rows(option_set.cls)
    names = [row.name if row.flag is None else f"{row.name} ({row.flag})" for row in table]
    name_width = max(len(name) for name in names)
    type_width = max(len(row.type) for row in table)
    default_width = max(len(row.default) for row in table)
    lines = [f"{option_set.name} ({option_set.how_to_set()}):"]
    for name, row in zip(names, table):
        line = f"  {name:<{name_width}}  {row.type:<{type_width}}  {row.default:<{default_width}}  {plain(row.doc)}"
        lines.append(line.rstrip())
    defaults = train_defaults(option_set)
    if defaults:
        width = max(len(name) for name, _ in defaults)
        lines += ["", f"{train_defaults_title(option_set)}:"]
        lines += [f"  {name:<{width}}  {value}" for name, value in defaults]
    return "\n".join(lines)


def _cell(text: str) -> str:
    # A bare | would end the cell; in a GFM table it must be escaped even inside a code span.
    return text.replace("|", r"\|")


def render_markdown(option_set: OptionSet) -> str:
    """A markdown table: option (and flag), type, default, meaning."""
    table = rows(option_set.cls)
    with_flags = any(row.flag is not None for row in table)
    header = ["Option", *(["Flag"] if with_flags else []), "Type", "Default", "Meaning"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        cells = [
            f"`{row.name}`",
            *([f"`{row.flag}`" if row.flag else ""] if with_flags else []),
            row.type,
            f"`{row.default}`",
            plain(row.doc),
        ]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    defaults = train_defaults(option_set)
    if defaults:
        lines += [
            "",
            f"Defaults for `hpcopt train --problem {option_set.name}`: each applies only when neither a flag, "
            "the `--config` file nor `--set` gives the option; `time_limit` only when `epochs` is not given "
            "either; optimizer options only to that optimizer.",
            "",
            "| Train option | Default |",
            "|---|---|",
        ]
        # Prose ("the whole training set") reads as text; values and names as code.
        lines += [f"| `{_cell(name)}` | {_cell(value if ' ' in value else f'`{value}`')} |" for name, value in defaults]
    return "\n".join(lines)


def list_names() -> str:
    """What ``hpcopt options`` without a name prints."""
    sets = option_sets()
    by_kind: dict[str, list[str]] = {}
    for option_set in sets.values():
        by_kind.setdefault(option_set.kind, []).append(option_set.name)
    return "\n".join(
        [
            f"optimizers: {', '.join(by_kind['optimizer'])}",
            f"problems:   {', '.join(by_kind['problem'])}",
            "train:      train",
            "hpcopt options NAME lists the options of NAME, with type, default and meaning.",
        ]
    )


def rewrite_blocks(text: str, where: str = "<text>") -> str:
    """``text`` with the content of every ``<!-- options: NAME -->`` … ``<!-- /options -->`` block regenerated.

    Markers inside fenced code blocks are text (docs that show the syntax), not blocks.

    Args:
        text: markdown.
        where: names the text (a file path) in error messages.

    Raises:
        ConfigError: a block names no option set, is not closed, or is nested in another.
    """
    output: list[str] = []
    open_at: int | None = None
    fence = ""  # the opening fence of the code block we are in, "" outside one
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        fence_match = FENCE.match(line) if open_at is None else None
        if fence_match is not None or fence:
            marker = fence_match["fence"] if fence_match is not None else ""
            if not fence:
                fence = marker
            elif marker.startswith(fence[0]) and len(marker) >= len(fence) and not line.strip().strip(fence[0]):
                fence = ""  # a closing fence: the same character, at least as long, nothing after it
            output.append(line)
            continue
        start, end = BLOCK_START.match(line), BLOCK_END.match(line)
        if start is not None:
            if open_at is not None:
                raise ConfigError(f"{where}:{number}: options block inside the block opened at line {open_at}")
            try:
                table = render_markdown(lookup(start["name"]))
            except ConfigError as exc:
                raise ConfigError(f"{where}:{number}: {exc}") from None
            # Blank lines around the table: it must not run into the markers' HTML blocks.
            output.extend([line, "\n", table + "\n", "\n"])
            open_at = number
        elif end is not None:
            if open_at is None:
                raise ConfigError(f"{where}:{number}: <!-- /options --> without an opening marker")
            output.append(line)
            open_at = None
        elif open_at is None:
            output.append(line)
    if open_at is not None:
        raise ConfigError(f"{where}:{open_at}: options block not closed by <!-- /options -->")
    return "".join(output)


def markdown_files(paths: Iterable[str | Path]) -> list[Path]:
    """The ``.md`` files named by ``paths``: files as given, folders searched recursively."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(path.rglob("*.md")))
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"{path} does not exist")
    return found


def stale_files(paths: Iterable[str | Path]) -> list[Path]:
    """The markdown files under ``paths`` whose options blocks differ from the dataclasses."""
    return [path for path in markdown_files(paths) if rewrite_blocks(_read(path), str(path)) != _read(path)]


def write_docs(paths: Iterable[str | Path]) -> list[Path]:
    """Regenerate every options block under ``paths``; the files that changed."""
    changed = []
    for path in markdown_files(paths):
        text = _read(path)
        new = rewrite_blocks(text, str(path))
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read: {exc}") from None


def add_options_parser(sub: Any) -> None:
    """The ``options`` sub-command."""
    p = sub.add_parser(
        "options",
        help="list the options of an optimizer, a problem or train (type, default, meaning)",
        description="Options of NAME (an optimizer, a problem, or train); without NAME, the names.",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="apts-d, hf, poisson2d, train, …")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument(
        "--write-docs",
        dest="write_docs",
        action="append",
        default=[],
        metavar="PATH",
        help="regenerate the <!-- options: NAME --> blocks of the markdown files in PATH (a file or a folder)",
    )


def run_options(args: argparse.Namespace) -> str:
    """What ``hpcopt options`` prints."""
    paths: Sequence[str] = args.write_docs
    if paths:
        if args.name is not None:
            raise ConfigError("give NAME or --write-docs, not both")
        changed = write_docs(paths)
        return "\n".join(f"rewrote {path}" for path in changed) if changed else "options blocks up to date"
    if args.name is None:
        return list_names()
    option_set = lookup(args.name)
    return render_markdown(option_set) if args.markdown else render_text(option_set)
