"""Fault injection for the reliability tests (``HPCOPT_FAULT``).

:mod:`~hpcopt.testing.faults` raises, stalls, kills or poisons values at named points of
a step on a chosen rank.  The variable is read on first use, and an unset one costs one
``is None`` test per hook.  It may import :mod:`hpcopt.errors` and the standard
library only, so every layer can hold a hook.
"""
