"""Problems named on the command line that are not built in: ``MODULE:ATTR``, ``FILE.py:ATTR``, entry points.

``hpcopt train --problem SPEC`` accepts, besides a built-in name:

* ``package.module:attr`` (as uvicorn and gunicorn name an application): the module is
  imported from ``sys.path`` (the current directory included);
* ``path/to/file.py:attr``: the file is loaded as a module of its own (relative paths
  from the current directory);
* a name that an installed package registers in the entry-point group
  ``hpcopt.problems`` (``[project.entry-points."hpcopt.problems"] heat = "pkg.mod:make"``).

``attr`` (dots allowed: ``mod:Class.factory``) is a :class:`~hpcopt.problems.base.Problem`
(one made by :func:`hpcopt.problem`) or a callable returning one.  A callable is called
with ``seed`` and ``data_dir`` when its signature takes them (or ``**kwargs``) and with
the user's options (``--set problem.KEY=VALUE``, the TOML table named by the spec),
each as a keyword argument.

Every failure — a module that cannot be imported, a missing attribute, an option the
factory does not take, a factory that raises, a result that is not a problem — is a
:class:`~hpcopt.errors.ConfigError` naming the spec, raised by every rank alike before
any collective (the trainer agrees on it).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from hpcopt.errors import ConfigError, HpcoptError
from hpcopt.problems.base import Problem
from hpcopt.problems.custom import describe_error

#: The entry-point group in which installed packages register problem names.
ENTRY_POINT_GROUP = "hpcopt.problems"


def is_spec(name: str) -> bool:
    """Whether ``name`` is a ``MODULE:ATTR`` or ``FILE.py:ATTR`` spec rather than a name."""
    return ":" in name


def parse_literal(text: str) -> object:
    """A ``--set problem.KEY=VALUE`` value as a TOML literal (``3``, ``0.5``, ``true``, ``"text"``).

    Text that is no TOML literal (``fast``, ``a/b.txt``) stays the string it is.
    """
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def entry_point_names() -> list[str]:
    """The problem names installed packages register (group ``hpcopt.problems``)."""
    return sorted({entry.name for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})


def find_entry_point(name: str) -> str | None:
    """The ``module:attr`` an installed package registers for ``name``, or ``None``."""
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == name:
            return str(entry.value)
    return None


def _load_file(path: Path, spec: str) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"--problem {spec}: no file {path}")
    # A name of its own per file, so two plug-ins called problem.py do not collide in sys.modules.
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"hpcopt_plugin_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"--problem {spec}: {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before it runs, as an import would, so dataclasses and pickling in it work.
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _import(target: str, spec: str) -> ModuleType:
    """The module of a spec: a ``.py`` file (or a path) is loaded, anything else imported."""
    try:
        if target.endswith(".py") or "/" in target or "\\" in target:
            return _load_file(Path(target).expanduser(), spec)
        # The console script's sys.path lacks the current directory (python -m has it);
        # a plug-in module beside the job is found either way, as uvicorn finds an app.
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(target)
    except HpcoptError:
        raise
    except Exception as error:
        raise ConfigError(f"--problem {spec}: cannot import {target}: {describe_error(error)}") from None


def _attribute(module: ModuleType, path: str, spec: str) -> Any:
    value: Any = module
    for part in path.split("."):
        if not hasattr(value, part):
            where = module.__name__ if value is module else f"{module.__name__}:{path}"
            raise ConfigError(f"--problem {spec}: {where} has no attribute '{part}'")
        value = getattr(value, part)
    return value


def _call_factory(factory: Any, spec: str, arguments: Mapping[str, object], options: Mapping[str, object]) -> Any:
    """``factory(**wanted)``: ``seed``/``data_dir`` where the signature takes them, and every option."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = None
    kwargs: dict[str, object] = {}
    if parameters is None:
        kwargs = dict(options)
    else:
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        named = {
            name
            for name, p in parameters.items()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        }
        for name, value in arguments.items():
            if open_ended or name in named:
                kwargs[name] = value
        for key, value in options.items():
            name = key.replace("-", "_")
            if not open_ended and name not in named:
                accepted = sorted(named - set(arguments))
                raise ConfigError(
                    f"--problem {spec}: unknown option '{key}' (its options: {', '.join(accepted) or 'none'})"
                )
            kwargs[name] = value
    try:
        return factory(**kwargs)
    except HpcoptError:
        raise
    except Exception as error:
        raise ConfigError(f"--problem {spec}: the factory raised {describe_error(error)}") from None


def load_problem(
    spec: str, *, seed: int = 0, data_dir: str | None = None, options: Mapping[str, object] | None = None
) -> Problem:
    """The problem that ``spec`` (``MODULE:ATTR``, ``FILE.py:ATTR`` or an entry-point name) names.

    Raises:
        ConfigError: any failure to import, find, call or accept it (the message names ``spec``).
        DataError: the factory's own, passed on.
    """
    options = dict(options or {})
    target_spec = spec
    if not is_spec(spec):
        registered = find_entry_point(spec)
        if registered is None:
            raise ConfigError(f"unknown problem '{spec}'")
        target_spec = registered
    target, _, path = target_spec.rpartition(":")
    if not target or not path:
        raise ConfigError(f"--problem {spec}: expected MODULE:ATTR or path/to/file.py:ATTR")
    attribute = _attribute(_import(target, spec), path, spec)
    if isinstance(attribute, Problem):
        if options:
            raise ConfigError(
                f"--problem {spec}: is a problem, not a factory, so it takes no options (got {', '.join(options)})"
            )
        return attribute
    if not callable(attribute):
        raise ConfigError(
            f"--problem {spec}: is a {type(attribute).__name__}, neither a problem nor a callable returning one"
        )
    made = _call_factory(attribute, spec, {"seed": seed, "data_dir": data_dir}, options)
    if not isinstance(made, Problem):
        raise ConfigError(
            f"--problem {spec}: returned a {type(made).__name__}, not a problem (build one with hpcopt.problem(...))"
        )
    return made
