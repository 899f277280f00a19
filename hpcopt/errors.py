"""Exceptions that end a run with one clear line instead of a traceback.

Every error a user can cause (bad option, bad data, unwritable output) is an
``HpcoptError``.  The CLI catches it, prints ``hpcopt: error: <message>`` and exits
with a non-zero status on every rank; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class HpcoptError(Exception):
    """Base class of errors caused by the user's input, reported as one line."""


class ConfigError(HpcoptError):
    """An option, a config file or a ``--set`` value is invalid."""


class DataError(HpcoptError):
    """A dataset is missing, truncated or malformed."""


class OutputError(HpcoptError):
    """The run log or another output cannot be written."""


class NonFiniteError(HpcoptError):
    """A loss or gradient is NaN/Inf where the algorithm cannot recover."""


class AbortError(HpcoptError):
    """Another rank stalled or failed: the other ranks cannot be reached cleanly.

    Raised on the rank that noticed (a collective past ``--collective-timeout``, or a
    failure notice from another rank).  The CLI prints the line and calls
    ``MPI_Abort`` instead of returning, since the other ranks may never return.
    """
