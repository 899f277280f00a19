"""A user's model, loss and data as a :class:`~hpcopt.problems.base.Problem`: :class:`CustomProblem`.

:func:`hpcopt.problem` builds one; ``hpcopt train --problem MODULE:ATTR`` finds one
(:mod:`hpcopt.problems.plugin`).  The trainer and every optimizer then see the same
interface as for a built-in problem, so nothing downstream knows whose problem it is.

What a user gives, and what this module makes of it:

* ``model``: a callable returning a fresh ``nn.Module`` (called under the run's seed on
  every rank, so every rank starts from the same weights), or one module instance,
  trained in place, whose rank-0 state every rank takes at start-up.
* ``loss(outputs, targets)``: the mean over the rows of a batch (the criterion).
* ``train``, ``val``: ``(inputs, targets)`` tensor pairs (in memory) or map-style
  ``torch.utils.data.Dataset`` objects (:class:`~hpcopt.problems.streamed.StreamedRows`:
  a rank reads only its rows).
* ``metric``: ``"accuracy"``, ``"rel_l2"``, ``None`` or ``(outputs, targets) -> (sum, count)``.
* ``forward(net, inputs)``: how outputs are made from the network (a PINN's residuals).

Everything that can be checked without communication is checked twice: the shapes of
the data when the problem is made, and the pieces run once on a few training rows when a
run starts (:meth:`CustomProblem.check_model`), so a mistake is one clear error on every
rank rather than a traceback in the middle of a collective.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import IterableDataset

from hpcopt.errors import ConfigError, DataError, HpcoptError
from hpcopt.numerics.curvature import LocalObjective, parse_curvature
from hpcopt.numerics.flat import FlatParameters
from hpcopt.problems.base import Dataset, Net, Problem, as_sums, evaluation_mode
from hpcopt.problems.pinn import APTS_D_GAUSS_NEWTON, APTS_IP_GAUSS_NEWTON
from hpcopt.problems.streamed import StreamedRows

Loss = Callable[[Tensor, Tensor], Tensor]
Forward = Callable[[Net, Tensor], Tensor]
MetricSums = Callable[[Tensor, Tensor], tuple[Any, Any]]

#: The global batch when the user gives none: the whole training set, at most this many rows.
DEFAULT_BATCH_ROWS = 1000
#: Training rows the start-up check runs the model, loss, metric and curvature on.
PROBE_ROWS = 4

_METRIC_NAMES = {"accuracy": "val_accuracy", "rel_l2": "val_rel_l2_error"}

# What avoids curvature products, for the message of a forward that cannot be differentiated twice.
_FIRST_ORDER_RUNS = (
    "runs that take only gradients avoid them: apts-d with --set local_solver=lsr1 --set combine=average "
    "(and global_solver=lsr1 if global_passes > 0), apts-p and apts-ip "
    "with local_solver and global_solver lsr1 or cauchy (their defaults), or --optimizer sgd, adam, nlcg or neumann"
)


def describe_error(error: BaseException) -> str:
    """``Type: message`` on one line (torch's messages span several), for a one-line ``hpcopt: error:``."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def curvature_in_use(optimizer_config: object) -> str | None:
    """The curvature products (``hessian``, ``ggn``, …) an optimizer with this config takes; ``None``: none.

    Read from the config's fields, so that this layer need not import the optimizers:
    a ``curvature`` option is used unless the config names its trust-region solvers
    (``local_solver``, ``global_solver``) and none of those that run is ``steihaug``
    (the global solver does not run with ``global_passes=0``; APTS-D's ``combine=scaled``
    takes one product; Hessian-free has no such fields and always takes products).
    """
    kind = getattr(optimizer_config, "curvature", None)
    if not isinstance(kind, str):
        return None
    if getattr(optimizer_config, "combine", None) == "scaled":
        return kind  # APTS-D's scaled combination takes one product per outer iteration
    names = ["local_solver", "global_solver"]
    if getattr(optimizer_config, "global_passes", 1) == 0:
        names.remove("global_solver")
    solvers = [getattr(optimizer_config, name) for name in names if hasattr(optimizer_config, name)]
    if solvers and "steihaug" not in solvers:
        return None
    return kind


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else ()


def _dtype(value: Any) -> str:
    return str(value.dtype) if hasattr(value, "dtype") else type(value).__name__


def _rows(data: object, what: str) -> Dataset | StreamedRows:
    """``data`` as rows the trainer can shard: in memory for a tensor pair, read on demand for a Dataset."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)):
        if len(data) != 2 or not all(isinstance(part, Tensor) for part in data):
            raise ConfigError(f"{what} must be a pair of tensors (inputs, targets) or a torch.utils.data.Dataset")
        inputs, targets = data
        if inputs.dim() == 0 or targets.dim() == 0:
            raise DataError(f"{what}: inputs and targets need a first dimension that indexes samples")
        if inputs.shape[0] != targets.shape[0]:
            raise DataError(f"{what}: {inputs.shape[0]} input rows but {targets.shape[0]} target rows")
        if inputs.shape[0] == 0:
            raise DataError(f"{what} has no rows")
        return Dataset(inputs, targets)
    if isinstance(data, IterableDataset):
        raise ConfigError(f"{what} is an IterableDataset; hpcopt needs a map-style Dataset (dataset[i], len(dataset))")
    if isinstance(data, TorchDataset):
        if not hasattr(data, "__len__"):
            raise ConfigError(f"{what}: the Dataset has no __len__; hpcopt needs the number of rows")
        rows = StreamedRows(data, what=what)
        if len(rows) == 0:
            raise DataError(f"{what} has no rows")
        # The first and the last row: a set whose rows disagree usually shows it there.
        first, last = rows.row(0), rows.row(len(rows) - 1)
        _same_layout(first, last, f"{what} row 0", f"{what} row {len(rows) - 1}")
        return rows
    raise ConfigError(
        f"{what} must be a pair of tensors (inputs, targets) or a torch.utils.data.Dataset, got {type(data).__name__}"
    )


def _first_row(rows: Dataset | StreamedRows) -> tuple[Any, Any]:
    if isinstance(rows, StreamedRows):
        return rows.row(0)
    return rows.inputs[0], rows.targets[0]


def _same_layout(one: tuple[Any, Any], other: tuple[Any, Any], one_name: str, other_name: str) -> None:
    """Both rows' inputs, and both rows' targets, have one shape and one dtype (a :class:`DataError` if not)."""
    for part, a, b in (("input", one[0], other[0]), ("target", one[1], other[1])):
        if _shape(a) != _shape(b) or _dtype(a) != _dtype(b):
            raise DataError(
                f"rows disagree: {one_name} has {part} shape {_shape(a)} ({_dtype(a)}) but "
                f"{other_name} has {_shape(b)} ({_dtype(b)})"
            )


def _callable_name(value: object, fallback: str) -> str:
    name = getattr(value, "__name__", "")
    return name if isinstance(name, str) and name.isidentifier() else fallback


class CustomProblem(Problem):
    """A problem made of a user's model, loss, data, metric and forward (see :func:`hpcopt.problem`).

    Raises:
        ConfigError: a piece of the wrong kind (a loss that is not callable, an unknown metric).
        DataError: inputs and targets with different row counts, rows that disagree in
            shape, train and val rows of different shapes or dtypes.
    """

    models: tuple[str, ...]

    def __init__(
        self,
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
    ) -> None:
        if not isinstance(model, nn.Module) and not callable(model):
            raise ConfigError(
                f"model must be a torch.nn.Module or a callable returning one, got {type(model).__name__}"
            )
        if not callable(loss):
            raise ConfigError(f"loss must be a callable (outputs, targets) -> scalar, got {type(loss).__name__}")
        if forward is not None and not callable(forward):
            raise ConfigError(f"forward must be a callable (net, inputs) -> outputs, got {type(forward).__name__}")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ConfigError(f"name must be a non-empty string, got {name!r}")
        self._model_source = model
        self._loss = loss
        self._forward = forward
        self.least_squares = bool(least_squares)
        self.model_from_rank0 = isinstance(model, nn.Module)
        self.name = name or "custom"
        self.default_model = (
            _callable_name(type(model), "model") if isinstance(model, nn.Module) else _callable_name(model, "model")
        )
        self.models = (self.default_model,)
        self._metric = metric
        self.metric_name, self.metric_higher_is_better = self._describe_metric(metric, higher_is_better)
        train_rows = _rows(train, "train")
        val_rows = train_rows if val is None else _rows(val, "val")
        _same_layout(_first_row(train_rows), _first_row(val_rows), "train row 0", "val row 0")
        # StreamedRows offers every read the trainer and the optimizers make of a Dataset
        # (len, subset, chunks, batches, inputs, targets); the interface names the in-memory type.
        self.train = cast("Dataset", train_rows)
        self.val = cast("Dataset", val_rows)
        self.default_batch_size = min(len(train_rows), DEFAULT_BATCH_ROWS)
        self._module: nn.Module | None = None

    @staticmethod
    def _describe_metric(metric: object, higher_is_better: bool) -> tuple[str, bool]:
        if metric is None:
            return "val_loss", False
        if isinstance(metric, str):
            if metric not in _METRIC_NAMES:
                raise ConfigError(
                    f"unknown metric '{metric}' (choose from accuracy, rel_l2, None, or a callable "
                    "(outputs, targets) -> (sum, count))"
                )
            return _METRIC_NAMES[metric], metric == "accuracy"
        if callable(metric):
            return f"val_{_callable_name(metric, 'metric')}", bool(higher_is_better)
        raise ConfigError(f"metric must be 'accuracy', 'rel_l2', None or a callable, got {type(metric).__name__}")

    # -- the Problem interface ---------------------------------------------------------

    def _make_model(self, name: str) -> nn.Module:
        del name  # one model: the user's
        source = self._model_source
        if isinstance(source, nn.Module):
            model = source
        else:
            try:
                model = source()
            except HpcoptError:
                raise
            except Exception as error:
                raise ConfigError(f"the model factory raised {describe_error(error)}") from None
            if not isinstance(model, nn.Module):
                raise ConfigError(f"the model factory returned a {type(model).__name__}, not a torch.nn.Module")
        self._module = model
        return model

    def forward(self, net: Net, inputs: Tensor) -> Tensor:
        if self._forward is None:
            return net(inputs)
        return self._forward(net, inputs)

    def criterion(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self._loss(outputs, targets)

    def default_optimizer_options(self, optimizer: str) -> Mapping[str, object]:
        """For a least-squares loss, the APTS global passes on Gauss–Newton products, as for the PINNs."""
        if not self.least_squares:
            return {}
        if optimizer in ("apts-d", "apts-p"):
            return APTS_D_GAUSS_NEWTON
        if optimizer == "apts-ip":
            return APTS_IP_GAUSS_NEWTON
        if optimizer == "hf":
            return {"curvature": "ggn"}
        return {}

    def eval_sums(self, net: Net, data: Dataset) -> Tensor:
        """``[loss_sum, rows, metric_sum, metric_count]`` over ``data``, read chunk by chunk."""
        return self._sums(net, data, self._module)

    def _sums(self, net: Net, data: Dataset, module: nn.Module | None) -> Tensor:
        loss_sum, rows, metric_sum, metric_count = 0.0, 0, 0.0, 0.0
        device = next(module.parameters()).device if module is not None else None
        # A forward of the user's own may differentiate the network w.r.t. its inputs
        # (torch.autograd.grad), which needs grad mode; the parameters carry no graph.
        with torch.set_grad_enabled(self._forward is not None), evaluation_mode(module if module is not None else net):
            for chunk in data.chunks():
                inputs, targets = chunk.inputs, chunk.targets
                if device is not None:
                    inputs, targets = inputs.to(device), targets.to(device)
                outputs = self.forward(net, inputs)
                loss_sum += float(self.criterion(outputs, targets).detach()) * len(chunk)
                rows += len(chunk)
                part_sum, part_count = self._metric_sums(outputs.detach(), targets)
                metric_sum += part_sum
                metric_count += part_count
        return as_sums(loss_sum, rows, metric_sum, metric_count)

    def _metric_sums(self, outputs: Tensor, targets: Tensor) -> tuple[float, float]:
        metric = self._metric
        if metric is None:
            return 0.0, 0.0
        if metric == "accuracy":
            if outputs.dim() >= 2 and outputs.shape[1] >= 2:
                predicted = outputs.argmax(dim=1)
            else:  # one logit per row: class 1 where it is positive
                predicted = (outputs.reshape(targets.shape) > 0).to(targets.dtype)
            return float((predicted == targets).sum()), float(targets.numel())
        if metric == "rel_l2":
            error = outputs.reshape(targets.shape).to(torch.float64) - targets.to(torch.float64)
            return float((error**2).sum()), float((targets.to(torch.float64) ** 2).sum())
        assert callable(metric)
        result = metric(outputs, targets)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise ConfigError(
                f"the metric returned a {type(result).__name__}; it must return (sum, count) over the rows "
                "it is given, so that ranks can add them"
            )
        return float(result[0]), float(result[1])

    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        loss_sum, rows, metric_sum, metric_count = sums.tolist()
        metrics = {"val_loss": loss_sum / max(rows, 1.0)}
        if self._metric == "rel_l2":
            # An all-zero target would make the ratio undefined; fall back to the absolute error.
            metrics[self.metric_name] = math.sqrt(metric_sum / (metric_count if metric_count > 0 else 1.0))
        elif self._metric is not None:
            metrics[self.metric_name] = metric_sum / metric_count if metric_count > 0 else math.nan
        return metrics

    # -- the start-up check -------------------------------------------------------------

    def check_model(self, model: nn.Module, curvature: str | None) -> None:
        """Run the model, loss, metric and (when the optimizer takes them) curvature products on a few rows.

        On a copy of the model and under a forked random state, so the run that follows
        starts exactly as it would without the check.
        """
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("the model has no trainable parameters (nothing to optimize)")
        dtypes = sorted({str(p.dtype) for p in trainable})
        devices = sorted({str(p.device) for p in trainable})
        if len(dtypes) > 1 or len(devices) > 1:
            raise ConfigError(f"the model's parameters must share one dtype and device, found {dtypes} on {devices}")
        probe = self.train.subset(slice(0, min(PROBE_ROWS, len(self.train))))
        inputs, targets = probe.inputs, probe.targets
        copied = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            self._check_forward_and_loss(copied, inputs, targets, dtypes[0])
            local = LocalObjective(FlatParameters(copied), self.forward, self.criterion, inputs, targets)
            try:
                local.value_and_grad()
            except HpcoptError:
                raise
            except Exception as error:
                raise ConfigError(f"the gradient of the loss failed: {describe_error(error)}") from None
            try:
                local.value()
            except HpcoptError:
                raise
            except Exception as error:
                raise ConfigError(
                    f"the loss fails when the model is called through torch.func.functional_call, as every "
                    f"optimizer does for trial points ({describe_error(error)}); the forward must use "
                    "the parameters it is given (no weights read through .data or copied when it was built)"
                ) from None
            if curvature is not None:
                self._check_curvature(local, curvature)
            try:
                self.eval_metrics(self._sums(copied, Dataset(inputs, targets), copied))
            except HpcoptError:
                raise
            except Exception as error:
                raise ConfigError(f"the metric failed on the model's outputs: {describe_error(error)}") from None

    def _check_forward_and_loss(self, model: nn.Module, inputs: Tensor, targets: Tensor, dtype: str) -> None:
        rows = inputs.shape[0]
        try:
            outputs = self.forward(model, inputs)
        except HpcoptError:
            raise
        except Exception as error:
            hint = ""
            if inputs.is_floating_point() and str(inputs.dtype) != dtype:
                hint = f" (the inputs are {inputs.dtype} but the model's parameters are {dtype})"
            raise ConfigError(
                f"the model's forward failed on {rows} training rows{hint}: {describe_error(error)}"
            ) from None
        try:
            loss = self.criterion(outputs, targets)
        except HpcoptError:
            raise
        except Exception as error:
            raise ConfigError(f"the loss failed on the model's outputs: {describe_error(error)}") from None
        if not isinstance(loss, Tensor):
            raise ConfigError(f"the loss returned a {type(loss).__name__}; it must return a scalar tensor")
        if loss.dim() != 0:
            raise ConfigError(
                f"the loss returned a tensor of shape {tuple(loss.shape)}; it must return a scalar, "
                "the mean over the batch's rows (e.g. reduction='mean')"
            )
        if not loss.requires_grad:
            raise ConfigError("the loss does not depend on the model's parameters (it carries no gradient)")

    @staticmethod
    def _check_curvature(local: LocalObjective, curvature: str) -> None:
        kind = parse_curvature(curvature)
        try:
            operator = local.curvature(kind)
            operator(torch.ones(local.flat.numel, dtype=local.flat.dtype))
        except HpcoptError:
            raise
        except Exception as error:
            raise ConfigError(
                f"the optimizer's curvature products (curvature={curvature}) fail on this model: "
                f"{describe_error(error)}. They differentiate the forward twice (double backward for "
                "hessian and ggn; torch.func.jvp over torch.func.grad for hvp-forward-over-reverse); "
                f"{_FIRST_ORDER_RUNS}"
            ) from None
