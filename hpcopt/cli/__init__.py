"""Command line: argv and TOML files onto the typed option dataclasses, and the sub-commands.

Owns ``hpcopt train|analyze|jobs|calibrate|options|info``.  It may import every other layer; nothing
imports it except ``hpcopt.__main__`` and the console-script entry point.
"""

from hpcopt.cli.main import entry_point, main

__all__ = ["entry_point", "main"]
