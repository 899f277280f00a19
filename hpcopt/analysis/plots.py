"""PNG figures for ``hpcopt analyze --plot DIR`` (matplotlib, Agg backend, imported lazily).

* ``curves.png``: training loss and the first metric against wall time and epochs, one
  line per run;
* ``scaling.png``: speed-up and parallel efficiency against ranks per sweep, with the
  ideal lines and, when a model is given, the α–β prediction dashed beside each sweep;
* ``model.png`` (:func:`plot_predictions`): predicted efficiency to thousands of ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hpcopt.analysis.tables import Run, display_names
from hpcopt.errors import OutputError

if TYPE_CHECKING:
    from hpcopt.analysis.scaling import ScalingRow

__all__ = ["plot_curves", "plot_predictions", "plot_scaling"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise OutputError("--plot needs matplotlib: pip install 'hpcopt[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _efficiency_top(ax: Any, floor: float) -> float:
    """Upper y limit of an efficiency axis: ``floor``, or more when a point lies above it.

    Measured efficiencies can exceed 1 (cache effects, or an algorithm whose work per
    iteration depends on P); a fixed limit would cut them off the figure.
    """
    highest = max((float(np.nanmax(line.get_ydata())) for line in ax.get_lines() if len(line.get_ydata())), default=0.0)
    return max(floor, 1.05 * highest)


def _save(fig: Any, path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    except OSError as error:
        raise OutputError(f"cannot write figure {path}: {error.strerror or error}") from None
    finally:
        fig.clf()
    return path


def _label(run: Run, name: str) -> str:
    """``name`` (the run's shortest distinguishing path) and what tells runs of a sweep apart."""
    attrs = run.attributes
    return f"{name}: {attrs.get('optimizer', '?')} P={attrs.get('world_size', '?')} B={attrs.get('batch_size', '?')}"


def plot_curves(runs: Sequence[Run], outdir: str | Path) -> Path:
    """Loss and metric against wall time (s) and epochs, one line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    metric = next((name for run in runs for name in run.metric_names), None)
    for run, name in zip(runs, display_names([run.path for run in runs])):
        its, evs, label = run.iterations, run.evaluations, _label(run, name)
        if len(its.get("loss", ())):
            (line,) = axes[0, 0].plot(its["wall_time"], its["loss"], label=label)
            axes[0, 1].plot(its["epoch"], its["loss"], color=line.get_color(), label=label)
        if metric and len(evs.get(metric, ())):
            axes[1, 0].plot(evs["wall_time"], evs[metric], marker="o", label=label)
            axes[1, 1].plot(evs["epoch"], evs[metric], marker="o", label=label)
    for ax, xlabel, ylabel in (
        (axes[0, 0], "wall time (s)", "training loss (per step)"),
        (axes[0, 1], "epoch", "training loss (per step)"),
        (axes[1, 0], "wall time (s)", f"{metric or 'metric'} (validation)"),
        (axes[1, 1], "epoch", f"{metric or 'metric'} (validation)"),
    ):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    losses = [run.iterations["loss"] for run in runs if len(run.iterations.get("loss", ()))]
    if losses:
        low, high = min(np.nanmin(loss) for loss in losses), max(np.nanmax(loss) for loss in losses)
        if low > 0 and high / low > 10:  # log scale only when the loss spans a decade
            axes[0, 0].set_yscale("log")
            axes[0, 1].set_yscale("log")
    fig.suptitle("training curves")
    return _save(fig, Path(outdir) / "curves.png")


def plot_scaling(
    rows: Sequence[ScalingRow],
    outdir: str | Path,
    predictions: Mapping[str, Sequence[tuple[int, float]]] | None = None,
) -> Path:
    """Speed-up and efficiency against ranks, one line per (study, optimizer) with ideal lines.

    ``predictions`` maps a line's label (``"strong apts-d"``) to ``(ranks, efficiency)``
    pairs of the model, drawn dashed in the same colour.
    """
    plt = _pyplot()
    fig, (ax_speed, ax_eff) = plt.subplots(1, 2, figsize=(11, 4.5))
    lines: dict[str, list[ScalingRow]] = {}
    for row in rows:
        lines.setdefault(f"{row['study']} {row['optimizer']}", []).append(row)
    all_ranks = sorted({int(row["ranks"]) for row in rows})
    for label, points in lines.items():
        ranks = [int(p["ranks"]) for p in points]
        (line,) = ax_speed.plot(ranks, [p["speedup"] for p in points], marker="o", label=f"{label} (measured)")
        ax_eff.plot(ranks, [p["efficiency"] for p in points], marker="o", color=line.get_color(), label=label)
        if predictions and label in predictions:
            model_ranks = [p for p, _ in predictions[label]]
            model_eff = [e for _, e in predictions[label]]
            style = {"color": line.get_color(), "linestyle": "--", "marker": "x"}
            ax_eff.plot(model_ranks, model_eff, label=f"{label} (α–β model)", **style)
            ax_speed.plot(model_ranks, np.multiply(model_ranks, model_eff), label=f"{label} (α–β model)", **style)
            all_ranks = sorted(set(all_ranks) | set(model_ranks))
    if all_ranks:
        ax_speed.plot(all_ranks, all_ranks, color="black", linestyle=":", label="ideal")
        ax_eff.axhline(1.0, color="black", linestyle=":", label="ideal")
    for ax, ylabel in ((ax_speed, "speed-up (× smallest run; weak: scaled)"), (ax_eff, "parallel efficiency")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("MPI ranks")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax_speed.set_yscale("log", base=2)
    ax_eff.set_ylim(0, _efficiency_top(ax_eff, 1.1))
    fig.suptitle("scaling: median time per iteration")
    return _save(fig, Path(outdir) / "scaling.png")


def plot_predictions(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    path: str | Path,
    *,
    title: str,
    measured: Mapping[str, Sequence[tuple[int, float]]] | None = None,
) -> Path:
    """Predicted efficiency against ranks (log scale), one line per label; measured points as markers."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    # One colour per optimizer (the label minus its last word, the study); weak scaling dashed.
    colours: dict[str, str] = {}
    for label, points in curves.items():
        colour = colours.setdefault(label.rsplit(" ", 1)[0], f"C{len(colours)}")
        style = "--" if label.endswith(" weak") else "-"
        ax.plot([p for p, _ in points], [e for _, e in points], style, color=colour, label=f"{label} (model)")
    for label, points in (measured or {}).items():
        marker_colour = colours.get(label.rsplit(" ", 1)[0])
        ax.plot([p for p, _ in points], [e for _, e in points], "o", color=marker_colour, label=f"{label} (measured)")
    ax.axhline(1.0, color="black", linestyle=":", label="ideal")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, _efficiency_top(ax, 1.05))
    ax.set_xlabel("MPI ranks")
    ax.set_ylabel("parallel efficiency")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, Path(path))
