"""Command-line flags generated from the :class:`~hpcopt.config.Flag` metadata of dataclass fields.

Owns the mapping field ``batch_size`` ↔ flag ``--batch-size`` and back from the parsed
arguments, so that an option dataclass (``TrainConfig``) is the only place its
flags are written.  It may import only the standard library and :mod:`hpcopt.config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from hpcopt.config import flag_of, optional_inner


def flag_name(field_name: str) -> str:
    """``batch_size`` → ``--batch-size``."""
    return "--" + field_name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of dataclass ``cls`` that has :class:`~hpcopt.config.Flag` metadata, in field order.

    Every flag defaults to ``None`` so that :func:`flag_values` returns only what the
    user typed: a flag left out must not override the same key of a ``--config`` file.
    A ``bool`` field becomes a switch that sets ``True``.
    """
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = flag_of(field)
        if flag is None:
            continue
        kind = optional_inner(hints[field.name])[0]
        options: dict[str, Any] = {"dest": field.name, "help": flag.help}
        if kind is bool:
            options.update(action="store_true", default=None)
        else:
            # str needs no conversion; int and float are converted here so that a typo is argparse's usage error.
            if kind in (int, float):
                options["type"] = kind
            if flag.choices is not None:
                options["choices"] = flag.choices
        parser.add_argument(flag_name(field.name), **options)


def flag_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags of ``cls`` that were given on the command line, by field name."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if flag_of(field) is not None and getattr(args, field.name, None) is not None:
            values[field.name] = getattr(args, field.name)
    return values
