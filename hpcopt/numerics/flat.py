"""One contiguous parameter buffer, with the model's parameters as views into it.

A gradient, a trust-region correction or a Krylov vector is then one tensor of
``numel`` floats, so it crosses the network as one collective on one buffer and
every vector operation of an optimizer is a single torch call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call


class FlatParameters:
    """The trainable parameters of ``model`` as views into one flat buffer.

    After construction ``p.data`` of every parameter is a view into ``self.data``
    and ``p.grad`` a view into ``self.grad``; autograd accumulates into those
    views in place, so ``self.grad`` holds the flat gradient after ``backward``.
    Parameters are taken in ``model.named_parameters()`` order, which is the
    same on every rank for the same model definition.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        dtypes = {p.dtype for _, p in named}
        devices = {p.device for _, p in named}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"parameters must share one dtype and device, got {dtypes}, {devices}")
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.numel = self.offsets[-1]
        self.dtype = named[0][1].dtype
        self.device = named[0][1].device
        self.data = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        self.grad = torch.zeros_like(self.data)
        self._params = [p for _, p in named]
        with torch.no_grad():
            for p, view, grad_view in zip(self._params, self.views(self.data), self.views(self.grad)):
                view.copy_(p.data)
                p.data = view
                p.grad = grad_view

    def views(self, vector: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat ``vector`` shaped like the parameters, in order."""
        return [
            vector[start:end].view(shape) for start, end, shape in zip(self.offsets[:-1], self.offsets[1:], self.shapes)
        ]

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """A name → tensor dict of views into ``vector``, for ``torch.func.functional_call``."""
        return dict(zip(self.names, self.views(vector)))

    def blocks(self) -> Iterator[tuple[str, int, int]]:
        """``(name, start, end)`` of every parameter tensor in the flat buffer."""
        yield from zip(self.names, self.offsets[:-1], self.offsets[1:])

    def zero_grad(self) -> None:
        """Zero the flat gradient in place (the views stay attached)."""
        self.grad.zero_()
        # Autograd may have replaced a grad view by a fresh tensor (e.g. after a
        # user set ``p.grad = None``); re-attach so accumulation stays in place.
        for p, grad_view in zip(self._params, self.views(self.grad)):
            if p.grad is None or p.grad.data_ptr() != grad_view.data_ptr():
                p.grad = grad_view

    def copy_(self, vector: torch.Tensor) -> None:
        """Set the parameters to ``vector`` (in place; views stay valid)."""
        with torch.no_grad():
            self.data.copy_(vector)

    def clone(self) -> torch.Tensor:
        """A copy of the current flat parameter vector."""
        return self.data.detach().clone()

    @contextmanager
    def displaced(self, step: torch.Tensor) -> Iterator[None]:
        """Temporarily move the parameters to ``data + step``; restore them bit for bit."""
        saved = self.clone()
        with torch.no_grad():
            self.data.add_(step)
        try:
            yield
        finally:
            with torch.no_grad():
                self.data.copy_(saved)

    def buffer_snapshot(self) -> dict[str, torch.Tensor]:
        """A private copy of the module's buffers, for passes that must not update them.

        A curvature pass runs the forward of a batch whose gradient pass already
        updated the batch-norm running statistics; with a snapshot it leaves them alone.
        """
        return {name: buffer.detach().clone() for name, buffer in self.model.named_buffers()}

    def functional(
        self, theta: torch.Tensor, buffers: dict[str, torch.Tensor] | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The model as a function of its inputs with parameters ``theta`` (a flat vector).

        Composable with ``torch.func`` transforms and with ordinary autograd, which
        is how curvature products differentiate the model w.r.t. a flat vector.
        Buffers (e.g. batch-norm statistics) are the module's own, or ``buffers``
        (a :meth:`buffer_snapshot`) when given.
        """
        own = dict(self.model.named_buffers()) if buffers is None else buffers
        state = {**own, **self.unflatten(theta)}
        model = self.model

        def net(inputs: torch.Tensor) -> torch.Tensor:
            return functional_call(model, state, (inputs,))

        return net
