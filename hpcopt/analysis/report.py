"""``hpcopt analyze``: the summary table of run logs, then scaling, model and figures.

The top of the analysis layer, and the only module in it that imports the others:
:mod:`~hpcopt.analysis.tables` (reading logs, the summary table),
:mod:`~hpcopt.analysis.perfmodel` (the α–β model), :mod:`~hpcopt.analysis.scaling`
(sweeps and their efficiency), :mod:`~hpcopt.analysis.provenance` (whether the runs ran
the same code) and :mod:`~hpcopt.analysis.plots` (figures, matplotlib lazily).  Those
import downwards only (tables ← perfmodel ← scaling ← plots; tables ← provenance), so the
layer has no import cycle.  Nothing here imports MPI or the training layers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from hpcopt.analysis.perfmodel import Network
from hpcopt.analysis.provenance import provenance_note
from hpcopt.analysis.scaling import MODEL_COLUMNS, SCALING_COLUMNS, find_sweeps, model_rows, scaling_rows
from hpcopt.analysis.tables import (
    READ_TIMEOUT,
    SUMMARY_COLUMNS,
    Run,
    expand_paths,
    format_table,
    load_run_bounded,
    summary_rows,
    write_csv,
)
from hpcopt.errors import ConfigError, DataError


def analyze(
    paths: Sequence[str],
    *,
    csv: str | None = None,
    plot: str | None = None,
    network: Network | None = None,
    model_ranks: Sequence[int] = (),
    read_timeout: float = READ_TIMEOUT,
) -> str:
    """Load every run log in ``paths`` (directories: their ``*.h5``) and return the summary table.

    Under it, a note where the runs did not all run the same code (:func:`provenance_note`).

    Each log is read within ``read_timeout`` seconds (:func:`load_run_bounded`).

    Also writes it as CSV if asked.  When the runs form strong- or weak-scaling sweeps,
    the scaling table follows (:func:`scaling_report`; its CSV beside ``csv`` as
    ``<stem>-scaling.csv``), the α–β model's table if ``network`` is given, and PNG
    figures go into ``plot``.
    """
    if not paths:
        raise DataError("no run logs given to analyze")
    if not read_timeout > 0:
        raise ConfigError(f"--read-timeout must be > 0 seconds, got {read_timeout:g}")
    runs = [load_run_bounded(path, read_timeout) for path in expand_paths(paths)]
    rows = summary_rows(runs)
    if csv is not None:
        write_csv(rows, csv, SUMMARY_COLUMNS)
    table = format_table(rows, SUMMARY_COLUMNS) + provenance_note(runs)
    if len(runs) < 2 and plot is None and network is None:
        return table
    return table + scaling_report(runs, csv=csv, plot=plot, network=network, model_ranks=model_ranks)


def scaling_report(
    runs: Sequence[Run],
    *,
    csv: str | None = None,
    plot: str | None = None,
    network: Network | None = None,
    model_ranks: Sequence[int] = (),
) -> str:
    """The scaling (and model) tables of the sweeps among ``runs``; figures into ``plot``.

    Returns ``""`` when the runs form no sweep and no model was asked for.
    """
    sweeps = find_sweeps(runs)
    text = ""
    rows = scaling_rows(sweeps)
    if rows:
        text += "\nscaling (median time per iteration; speed-up relative to the smallest rank count)\n"
        text += format_table(rows, SCALING_COLUMNS)
        if csv is not None:
            stem, _ = os.path.splitext(csv)
            write_csv(rows, f"{stem}-scaling.csv", SCALING_COLUMNS)
    predictions: dict[str, list[tuple[int, float]]] = {}
    if network is not None:
        if not sweeps:
            raise DataError("--model needs a sweep: run logs of one configuration at two or more rank counts")
        model = model_rows(sweeps, network, model_ranks)
        text += f"\nα–β model ({network.describe()}; profile from each sweep's smallest run)\n"
        text += format_table(model, MODEL_COLUMNS)
        for row in model:
            predictions.setdefault(f"{row['study']} {row['optimizer']}", []).append(
                (int(row["ranks"]), float(row["model_eff"]))
            )
    if plot is not None:
        # plots imports matplotlib only when a figure is drawn
        from hpcopt.analysis.plots import plot_curves, plot_scaling

        figures = [plot_curves(runs, plot)]
        if rows:
            figures.append(plot_scaling(rows, plot, predictions or None))
        text += "\nfigures: " + ", ".join(str(path) for path in figures) + "\n"
    return text
