"""``hpcopt.problem``: a user's model, loss and data as a problem that ``hpcopt.train`` trains.

``hpcopt.Problem`` is the interface every problem implements, built-in or not
(:class:`hpcopt.problems.base.Problem`); :func:`problem` returns one made of the pieces
a user gives (:class:`hpcopt.problems.custom.CustomProblem`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hpcopt.problems.base import Problem
from hpcopt.problems.custom import CustomProblem, Forward, Loss, MetricSums


def problem(
    model: nn.Module | Callable[[], nn.Module],
    loss: Loss,
    train: object,
    val: object = None,
    *,
    metric: str | MetricSums | None = None,
    forward: Forward | None = None,
    least_squares: bool = False,
    name: str | None = None,
    higher_is_better: bool = False,
) -> Problem:
    """A problem made of your own model, loss and data, for :func:`hpcopt.train` and ``hpcopt train --problem``.

    Args:
        model: a callable returning a fresh ``torch.nn.Module`` (a class or a function;
            called on every rank after ``torch.manual_seed(seed)``, so every rank starts from
            the same weights), or one module instance (trained in place; every rank takes
            rank 0's weights and buffers at start-up).
        loss: ``loss(outputs, targets)``, the **mean** loss over the rows of a batch, a scalar
            tensor (``torch.nn.functional.cross_entropy``, ``mse_loss``, your own expression).
        train: ``(inputs, targets)`` tensors whose first dimension indexes samples, or a
            map-style ``torch.utils.data.Dataset`` whose ``dataset[i]`` is one ``(input, target)``
            pair of tensors (each rank then reads only the rows of its shards).
        val: the same, for the metrics of each evaluation; ``None``: the training set.
        metric: ``"accuracy"`` (``val_accuracy``; argmax over the second dimension, or a
            positive single logit), ``"rel_l2"`` (``val_rel_l2_error``, ‖out − target‖/‖target‖),
            ``None`` (``val_loss`` only), or a callable ``(outputs, targets) -> (sum, count)``
            whose mean ``Σsum/Σcount`` over the ranks' slices is the metric ``val_<name>``.
        forward: ``forward(net, inputs) -> outputs``, what the loss compares with the targets;
            default ``net(inputs)``.  ``net`` may be a ``torch.func.functional_call`` wrapper
            inside ``torch.func.jvp``/``grad`` transforms, so the forward must be built from torch
            operations (no ``.item()``, ``.numpy()`` or data-dependent Python branches on
            tensors; ``torch.where`` instead) and support double backward when the optimizer
            takes curvature products (``docs/custom-problems.md``).
        least_squares: the loss is a mean of squared residuals, so Gauss–Newton curvature is
            exact-PSD for it: APTS-D/-P then default to global passes on Gauss–Newton products.
        name: the problem's name in messages and the run log (default ``custom``).
        higher_is_better: for a callable ``metric``: ``--target`` is reached at or above it.

    Raises:
        hpcopt.errors.ConfigError: a piece of the wrong kind.
        hpcopt.errors.DataError: data whose rows disagree in number, shape or dtype.
    """
    return CustomProblem(
        model,
        loss,
        train,
        val,
        metric=metric,
        forward=forward,
        least_squares=least_squares,
        name=name,
        higher_is_better=higher_is_better,
    )


__all__ = ["Problem", "problem"]
