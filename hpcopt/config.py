"""Typed configuration: the one option system of optimizers, problems and ``hpcopt train``.

Every optimizer, every problem and the trainer are configured by a dataclass whose
fields are their options with defaults, each documented by one entry of the
``Attributes:`` section of the class docstring (:func:`field_docs` reads them back
for ``hpcopt options`` and the docs tables).  This module maps strings and TOML
values onto those fields with type checks, so a typo or a wrong type is a
``ConfigError`` naming the option before any work (or any collective) starts.
Fields that are also command-line flags carry a :class:`Flag` in their metadata
(:func:`flag_field`); the command line turns those into ``argparse`` flags.

It may import only the standard library and :mod:`hpcopt.errors`: every layer
imports it, so it must stay free of torch and of every other hpcopt module.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hpcopt.errors import ConfigError

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Wording:
    """How :func:`build_config` words its two errors: ``str.format`` templates.

    Problems kept the messages they had before they shared this machinery, so the
    wording is a parameter rather than one fixed text.

    Attributes:
        unknown: an unknown key; fields ``what``, ``key`` and ``names`` (the valid keys).
        wrong_type: a value not readable as the option's type; fields ``what``, ``key``,
            ``value`` (its ``repr``) and ``type``.
    """

    unknown: str = "unknown {what} option '{key}' (valid: {names})"
    wrong_type: str = "option '{key}': expected {type}, got {value}"


DEFAULT_WORDING = Wording()


@dataclass(frozen=True)
class Flag:
    """Metadata of a dataclass field that is also a command-line flag ``--field-name``.

    Attributes:
        help: the flag's ``--help`` text (``None``: listed without one).
        choices: the only values the flag accepts (``None``: any value of the field's type).
    """

    help: str | None = None
    choices: tuple[str, ...] | None = None


#: Metadata key of a float field that accepts ``inf`` and ``nan`` (:func:`nonfinite_field`).
NONFINITE = "nonfinite"


def flag_field(
    default: Any, *, help: str | None = None, choices: tuple[str, ...] | None = None, nonfinite: bool = False
) -> Any:
    """A dataclass field with ``default`` that the command line also offers as a flag.

    ``nonfinite=True`` lets a float option take ``inf`` or ``nan`` (refused by default).
    """
    return dataclasses.field(default=default, metadata={"flag": Flag(help, choices), NONFINITE: nonfinite})


def nonfinite_field(default: Any) -> Any:
    """A float option that may be ``inf`` or ``nan``; every other float option must be finite.

    A learning rate, a radius or a target of ``inf`` or ``nan`` is a typo that would only
    show as NaN losses hours later, so :func:`build_config` refuses non-finite values
    unless the field says, with this, that one means something (say, "no bound").
    """
    return dataclasses.field(default=default, metadata={NONFINITE: True})


def flag_of(field: dataclasses.Field[Any]) -> Flag | None:
    """The :class:`Flag` of ``field``, or ``None`` when it is not a command-line flag."""
    return field.metadata.get("flag")


class _WrongType(Exception):
    """A value that cannot be read as its option's type; :func:`build_config` words the error."""


def optional_inner(kind: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``, ``(kind, False)`` for any other type."""
    origin = typing.get_origin(kind)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0], True
    return kind, False


def type_name(kind: Any) -> str:
    """``int``, ``float``, ``str``, ``bool``, or ``int | None`` and the like."""
    inner, optional = optional_inner(kind)
    name = getattr(inner, "__name__", str(inner))
    return f"{name} | None" if optional else name


def _coerce(value: Any, kind: Any) -> Any:
    """Convert ``value`` (a string from the command line or a TOML value) to ``kind``.

    Raises:
        _WrongType: ``value`` cannot be read as ``kind``.
    """
    inner, optional = optional_inner(kind)
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null"}):
            return None
        return _coerce(value, inner)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str) and "e" in value.lower():
                number = float(value)
                if not number.is_integer():  # "1.5e0"; "1e400" is inf and overflows int() below
                    raise ValueError
                return int(number)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError, OverflowError):
        pass
    else:
        return value
    raise _WrongType


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def build_config(cls: type[T], values: Mapping[str, Any], *, what: str, wording: Wording = DEFAULT_WORDING) -> T:
    """Instantiate dataclass ``cls`` from ``values`` (unknown keys and bad types are errors).

    Args:
        cls: the options dataclass; its ``validate()``, when it has one, runs last.
        values: option name (``-`` or ``_`` between words) to a string or TOML value.
        what: names the option set in error messages (``train``, ``apts-d``, ``poisson2d``).
        wording: the error messages' templates.
    """
    hints = typing.get_type_hints(cls)
    names = field_names(cls)
    may_be_nonfinite = {f.name for f in dataclasses.fields(cls) if f.metadata.get(NONFINITE, False)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in names:
            raise ConfigError(wording.unknown.format(what=what, key=key, names=", ".join(names) or "none"))
        try:
            kwargs[name] = _coerce(value, hints[name])
        except _WrongType:
            kind = optional_inner(hints[name])[0]
            kind_name = getattr(kind, "__name__", str(kind))
            raise ConfigError(
                wording.wrong_type.format(what=what, key=key, value=repr(value), type=kind_name)
            ) from None
        number = kwargs[name]
        if isinstance(number, float) and not math.isfinite(number) and name not in may_be_nonfinite:
            raise ConfigError(f"{what} option '{key}' must be a finite number, got {value!r}")
    config = cls(**kwargs)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def parse_set(items: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` → ``{"a": "1", "b": "x"}``; malformed items are errors."""
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        result[key.strip()] = value.strip()
    return result


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; a missing or malformed file is a one-line error."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not valid TOML: it is not UTF-8 text") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None


def require(condition: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``condition`` holds (for ``validate`` methods)."""
    if not condition:
        raise ConfigError(message)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


_ENTRY = re.compile(r"(?P<names>[A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*:(?:\s+(?P<text>.*))?$")
# A second entry on the same line, "damping_inc: 1.5.  damping_dec: 2/3.": two spaces, then names and a colon.
_INLINE = re.compile(r"\s{2,}(?P<names>[A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*):\s")


def _split_names(names: str) -> list[str]:
    return [name.strip() for name in names.split(",")]


def _attribute_entries(doc: str, known: set[str]) -> list[tuple[list[str], str]]:
    """``(names, text)`` of each entry of the ``Attributes:`` section of docstring ``doc``.

    An entry is ``name: text`` or ``name_a, name_b: text`` at the section's first
    indentation, continued by the more indented lines below it.  A second entry on the
    same line counts only when all its names are in ``known``, so that ordinary prose
    containing a colon is never cut.
    """
    lines = inspect.cleandoc(doc).splitlines()
    header = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    if header is None:
        return []
    header_indent = len(lines[header]) - len(lines[header].lstrip())
    entry_indent: int | None = None
    raw: list[tuple[list[str], list[str]]] = []
    for line in lines[header + 1 :]:
        if not line.strip():
            continue  # the section ends at the first line not indented below its header, not at a blank
        indent = len(line) - len(line.lstrip())
        if indent <= header_indent:
            break
        if entry_indent is None:
            entry_indent = indent
        match = _ENTRY.match(line.strip()) if indent == entry_indent else None
        if match is not None:
            raw.append((_split_names(match["names"]), [match["text"] or ""]))
        elif raw:
            raw[-1][1].append(line.strip())
    entries: list[tuple[list[str], str]] = []
    for names, parts in raw:
        text = " ".join(part for part in parts if part)
        cuts = [m for m in _INLINE.finditer(text) if set(_split_names(m["names"])) <= known]
        start = 0
        for cut in cuts:
            entries.append((names, " ".join(text[start : cut.start()].split())))
            names, start = _split_names(cut["names"]), cut.end()
        entries.append((names, " ".join(text[start:].split())))
    return entries


def field_docs(cls: type) -> dict[str, str]:
    """One line of meaning per documented field of dataclass ``cls``, from ``Attributes:`` sections.

    The docstrings of ``cls`` and of its bases are read, base classes first, so a
    subclass documents only the fields it adds (or redefines) and inherits the rest:
    the shared APTS options are documented once, in ``APTSOptions``.  Fields that no
    docstring documents are absent from the result.
    """
    known = set(field_names(cls))
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = klass.__dict__.get("__doc__")
        if not isinstance(doc, str):
            continue
        for names, text in _attribute_entries(doc, known):
            for name in names:
                if name in known:
                    docs[name] = text
    return docs
