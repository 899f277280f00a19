"""Taylor-mode jets: a network's value with its first and second derivative along each input axis.

A PINN's residual needs ``u``, ``∂_i u`` and ``∂_i² u`` at each collocation point
``x ∈ R^d``.  When the network is cut into pipeline stages (APTS-IP) no rank can
differentiate the whole network w.r.t. ``x``, so each stage propagates the
derivatives of its own input instead: the pipeline tensor is a *jet* of shape
``(batch, 1 + 2d, width)`` holding, along dim 1,

* ``[0]``: the activation ``h``,
* ``[1 : 1+d]``: ``∂_i h`` for each input axis i,
* ``[1+d : 1+2d]``: ``∂_i² h`` for each input axis i.

The batch stays first, so micro-batching splits jets like activations.  The first
stage starts from ``(x, e_i, 0)`` (:func:`input_jet`); a stage ``f`` maps a jet to
``(f(h), Df[∂_i h], D²f[∂_i h, ∂_i h] + Df[∂_i² h])`` (:func:`apply_to_jet`), the
chain rule of second order along one direction, so composing stages composes jets
exactly.  Only pure second derivatives are carried (no ``∂_i ∂_j``), which is all
that a Laplacian, a diffusion term or a first-order time derivative need.

Cost: a jet is ``1 + 2d`` activations, on the wire and in memory, and a stage's
forward is one forward-over-forward ``jvp`` on ``d`` copies of the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, cast

import torch
from torch import Tensor
from torch.func import jvp

Net = Callable[[Tensor], Tensor]


class ScalarJet(NamedTuple):
    """The jet of a scalar output ``u`` at ``n`` points in ``R^d``.

    Attributes:
        value: ``u``, shape ``(n,)``.
        first: ``∂_i u``, shape ``(n, d)``.
        second: ``∂_i² u``, shape ``(n, d)``.
    """

    value: Tensor
    first: Tensor
    second: Tensor


def jet_axes(jet: Tensor) -> int:
    """The number d of input axes of a ``(batch, 1 + 2d, width)`` jet."""
    if jet.dim() != 3 or jet.shape[1] % 2 != 1:
        raise ValueError(f"a jet has shape (batch, 1 + 2d, width), got {tuple(jet.shape)}")
    return (jet.shape[1] - 1) // 2


def input_jet(points: Tensor) -> Tensor:
    """The jet of the identity at ``points`` ``(n, d)``: value x, ∂_i x = e_i, ∂_i² x = 0."""
    rows, axes = points.shape
    basis = torch.eye(axes, dtype=points.dtype, device=points.device).expand(rows, axes, axes)
    return torch.cat([points[:, None, :], basis, torch.zeros_like(basis)], dim=1)


def apply_to_jet(net: Net, jet: Tensor) -> Tensor:
    """The jet of ``net ∘ h`` from the jet of ``h``, both ``(batch, 1 + 2d, ·)``.

    ``net`` must act on the last dimension and treat every leading index alike
    (linear layers and elementwise activations do): the d directions are then one
    ``(batch, d, width)`` tensor through one pass rather than d passes.  Nested
    ``torch.func.jvp`` composes with ordinary autograd, so the result can be
    back-propagated to ``net``'s parameters and to the incoming jet.
    """
    axes = jet_axes(jet)
    # A copy per axis: forward-mode AD refuses a primal whose elements share memory (expand).
    value = jet[:, :1].expand(-1, axes, -1).contiguous()
    first, second = jet[:, 1 : 1 + axes], jet[:, 1 + axes :]

    def slope(at: Tensor, direction: Tensor) -> tuple[Tensor, Tensor]:
        # torch.func.jvp is annotated as a 2- or 3-tuple whatever has_aux says.
        output, tangent = cast("tuple[Tensor, Tensor]", jvp(net, (at,), (direction,)))
        # The value rides out as aux: the inner jvp computes f(h) anyway.
        return tangent, output

    # d/dt Df(h + t·v)[v + t·a] at t = 0 is D²f[v, v] + Df[a]: the second-order chain rule.
    first_out, second_out, value_out = cast(
        "tuple[Tensor, Tensor, Tensor]", jvp(slope, (value, first), (first, second), has_aux=True)
    )
    return torch.cat([value_out[:, :1], first_out, second_out], dim=1)


def scalar_jet(jet: Tensor) -> ScalarJet:
    """Split the jet of a network with one output, ``(n, 1 + 2d, 1)``, into ``u``, ``∂_i u``, ``∂_i² u``."""
    axes = jet_axes(jet)
    if jet.shape[2] != 1:
        raise ValueError(f"expected the jet of a scalar output, got width {jet.shape[2]}")
    flat = jet[:, :, 0]
    return ScalarJet(flat[:, 0], flat[:, 1 : 1 + axes], flat[:, 1 + axes :])
