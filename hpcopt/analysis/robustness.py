"""The figure and table of ``hpcopt study robustness``: the final metric against each optimizer's knob.

One line per optimizer over the values of its own knob (learning rate, Δ₀, damping),
all on one logarithmic axis: a flat line is an optimizer that needs no tuning.  Runs
that failed or diverged show as gaps (their value is NaN), not as points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hpcopt.analysis.plots import _pyplot
from hpcopt.analysis.tables import load_run_bounded, write_csv
from hpcopt.errors import HpcoptError

__all__ = ["KnobResult", "plot_robustness", "read_results", "robustness_table"]

COLUMNS = ("optimizer", "knob", "value", "status", "metric", "final_metric_value", "best_metric_value", "wall_time")


@dataclass
class KnobResult:
    """One run of the study as read back from its log (``status`` ``missing`` when there is none)."""

    optimizer: str
    knob: str
    value: float
    status: str
    metric: str
    final: float
    best: float
    wall_time: float


def _higher_is_better(metric: str) -> bool:
    return "accuracy" in metric


def read_results(points: Sequence[tuple[str, str, float, Path]]) -> list[KnobResult]:
    """``(optimizer, knob, value, log)`` of each run → its result (NaN where the run has none)."""
    results = []
    for optimizer, knob, value, log in points:
        status, metric, final, best, wall = "missing", "", math.nan, math.nan, math.nan
        if log.exists():
            try:
                run = load_run_bounded(log)
            except HpcoptError:
                status = "unreadable"
            else:
                status = run.status
                names = run.metric_names
                metric = names[0] if names else "val_loss"
                column = run.evaluations.get(metric)
                values = [float(v) for v in (column if column is not None else ()) if math.isfinite(float(v))]
                if values and status == "completed":
                    final = values[-1]
                    best = max(values) if _higher_is_better(metric) else min(values)
                wall_times = run.evaluations.get("wall_time")
                wall = float(wall_times[-1]) if wall_times is not None and len(wall_times) else math.nan
        results.append(KnobResult(optimizer, knob, value, status, metric, final, best, wall))
    return results


def robustness_table(results: Sequence[KnobResult]) -> list[dict[str, object]]:
    return [
        {
            "optimizer": r.optimizer,
            "knob": r.knob,
            "value": r.value,
            "status": r.status,
            "metric": r.metric,
            "final_metric_value": r.final,
            "best_metric_value": r.best,
            "wall_time": r.wall_time,
        }
        for r in results
    ]


def write_table(results: Sequence[KnobResult], path: str | Path) -> None:
    write_csv(robustness_table(results), str(path), COLUMNS)


def plot_robustness(results: Sequence[KnobResult], path: str | Path, title: str = "") -> Path:
    """The final metric against the knob, one line per optimizer (log x); the figure's path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    metric = next((r.metric for r in results if r.metric), "final metric")
    for optimizer in dict.fromkeys(r.optimizer for r in results):
        mine = sorted((r for r in results if r.optimizer == optimizer), key=lambda r: r.value)
        knob = mine[0].knob
        ax.plot([r.value for r in mine], [r.final for r in mine], marker="o", label=f"{optimizer} ({knob})")
    ax.set_xscale("log")
    if not _higher_is_better(metric):
        ax.set_yscale("log")
    ax.set_xlabel("value of the tuning knob: learning rate, initial radius Δ₀ or damping")
    ax.set_ylabel(f"final {metric}")
    ax.set_title(title or "robustness: final metric against each optimizer's knob", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
