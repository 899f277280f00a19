"""``J v`` from a forward's stored activations, for models that are a chain of standard layers.

The Gauss–Newton product ``Jᵀ H_L J v`` needs ``J v``, the directional derivative of
the model's outputs.  The generic ways to get it re-enter the model twice: forward mode
(``torch.func.jvp``) re-runs the primal forward beside the tangent one, and the
double-vjp trick differentiates a backward.  Both cost about two forwards per product.
Where the forward is a chain — each layer's input the previous layer's output, every
layer one of those below — the tangent can instead be pushed through the chain from
the activations that the forward already stored for the product's ``Jᵀ`` half:

* ``Linear``, ``Conv1d``/``Conv2d``: ``dz = layer(da; W) + layer(a; V_W) + V_b``
  (the first term vanishes for the first layer, whose input does not depend on θ);
* ``ReLU``, ``Tanh``, ``Sigmoid``: ``dz = σ'(a) ⊙ da`` from the stored output;
* ``MaxPool1d``/``MaxPool2d``: ``da`` gathered at the forward's arg-max;
* ``AvgPool1d``/``AvgPool2d``, ``Flatten``, ``Identity``: the layer applied to ``da``;
* ``Dropout`` in eval mode or with ``p = 0``: the identity.

That is about one forward per product.  :func:`record_chain` records a forward through
forward hooks and checks that it is such a chain (by tensor identity, so a forward
that differentiates w.r.t. its inputs, as a PINN's does, or that calls a layer twice,
is not); anything else returns ``None`` and the caller keeps its generic product.
Batch norm in training mode is not a chain layer: its output depends on the whole
batch's statistics, which depend on θ.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from hpcopt.numerics.flat import FlatParameters

_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d)
_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid)
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d)
_LINEAR_MAPS = (nn.AvgPool1d, nn.AvgPool2d, nn.Flatten, nn.Identity)


def _supported(module: nn.Module) -> bool:
    if isinstance(module, _AFFINE):
        # Other padding modes pad by a θ-independent but non-zero rule; keep them generic.
        return not isinstance(module, nn.Conv1d | nn.Conv2d) or module.padding_mode == "zeros"
    if isinstance(module, nn.Dropout):
        return not module.training or module.p == 0.0
    return isinstance(module, _ELEMENTWISE + _MAX_POOLS + _LINEAR_MAPS)


@dataclass
class _Layer:
    """One call of a layer in the recorded forward."""

    module: nn.Module
    input: Tensor
    output: Tensor
    weight: Tensor | None = None  # the parameters the call used (functional_call's, not the module's own)
    bias: Tensor | None = None
    cache: dict[str, Tensor] = field(default_factory=dict)


class LayerChain:
    """A recorded forward that is a chain of standard layers: ``J v`` from its activations.

    Args:
        layers: The calls in order, each one's input the previous one's output.
        tangent_slices: For each layer, the flat-vector slices of its weight and bias
            (``None`` for a parameter that is not trained).
    """

    def __init__(self, layers: list[_Layer], tangent_slices: list[tuple[slice | None, slice | None]]) -> None:
        self._layers = layers
        self._slices = tangent_slices

    def jvp(self, v: Tensor) -> Tensor:
        """``J v``: the derivative of the outputs along the flat parameter direction ``v``."""
        with torch.no_grad():
            tangent: Tensor | None = None  # None: the tangent is zero (no parameter seen yet)
            for layer, (weight_slice, bias_slice) in zip(self._layers, self._slices):
                tangent = _layer_jvp(layer, tangent, v, weight_slice, bias_slice)
            if tangent is None:
                return torch.zeros_like(self._layers[-1].output)
            return tangent


def _view(v: Tensor, where: slice | None, like: Tensor | None) -> Tensor | None:
    if where is None or like is None:
        return None
    return v[where].view(like.shape)


def _affine(module: nn.Module, inputs: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(inputs, weight, bias)
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
    return conv(inputs, weight, bias, module.stride, module.padding, module.dilation, module.groups)


def _layer_jvp(
    layer: _Layer, tangent: Tensor | None, v: Tensor, weight_slice: slice | None, bias_slice: slice | None
) -> Tensor | None:
    module = layer.module
    if isinstance(module, _AFFINE):
        assert layer.weight is not None
        d_weight = _view(v, weight_slice, layer.weight)
        d_bias = _view(v, bias_slice, layer.bias)
        out: Tensor | None = None
        if tangent is not None:
            out = _affine(module, tangent, layer.weight, None)
        if d_weight is not None:
            term = _affine(module, layer.input, d_weight, None)
            out = term if out is None else out.add_(term)
        if d_bias is not None:
            # A linear layer's bias runs along the last dimension, a convolution's along the channels.
            spatial = 0 if isinstance(module, nn.Linear) else layer.output.dim() - 2
            bias_term = d_bias.view((-1,) + (1,) * spatial)
            out = bias_term.expand_as(layer.output).clone() if out is None else out.add_(bias_term)
        return out
    if tangent is None:
        return None  # every other layer maps a zero tangent to zero
    if isinstance(module, _ELEMENTWISE):
        if "slope" not in layer.cache:
            z = layer.output
            if isinstance(module, nn.ReLU):
                slope = (z > 0).to(z.dtype)
            elif isinstance(module, nn.Tanh):
                slope = 1 - z * z
            else:
                slope = z * (1 - z)
            layer.cache["slope"] = slope
        return tangent * layer.cache["slope"]
    if isinstance(module, _MAX_POOLS):
        if "indices" not in layer.cache:
            pool = F.max_pool1d if isinstance(module, nn.MaxPool1d) else F.max_pool2d
            _, indices = pool(
                layer.input,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                ceil_mode=module.ceil_mode,
                return_indices=True,
            )
            layer.cache["indices"] = indices
        indices = layer.cache["indices"]
        # The arg-max indices count within each (sample, channel) plane.
        return tangent.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)
    if isinstance(module, nn.Dropout):
        return tangent  # inactive (eval mode or p = 0): the identity, and no random draw
    # AvgPool, Flatten, Identity: linear maps independent of θ.
    return module(tangent)


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if not any(True for _ in m.children())]


def could_be_chain(model: nn.Module) -> bool:
    """Whether every leaf module of ``model`` is a chain layer: the static half of :func:`record_chain`'s test."""
    return all(_supported(module) for _, module in _leaves(model))


def record_chain(flat: FlatParameters, run: Callable[[], Tensor]) -> tuple[Tensor, LayerChain | None]:
    """Run ``run()`` (a forward of ``flat.model``) and return its outputs and, if it is a chain, the chain.

    ``run`` may call the model through :meth:`FlatParameters.functional`: the hooks
    record the parameters each call used.  The chain is ``None`` unless every leaf
    module that ran is supported, ran once, took the previous one's output as input,
    the last one's output is what ``run`` returned, and every trained parameter
    belongs to one of those layers.
    """
    model = flat.model
    if not could_be_chain(model):
        return run(), None  # e.g. a transformer: no hooks, no recorded activations
    layers: list[_Layer] = []
    bad: list[nn.Module] = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if len(inputs) != 1 or not isinstance(output, Tensor):  # every leaf is supported (checked above)
            bad.append(module)
            return
        weight = getattr(module, "weight", None) if isinstance(module, _AFFINE) else None
        bias = getattr(module, "bias", None) if isinstance(module, _AFFINE) else None
        layers.append(_Layer(module, inputs[0], output, weight, bias))

    leaves = _leaves(model)
    handles: list[RemovableHandle] = [m.register_forward_hook(hook) for _, m in leaves]
    try:
        outputs = run()
    finally:
        for handle in handles:
            handle.remove()
    if bad or not layers or layers[-1].output is not outputs or layers[0].input.requires_grad:
        return outputs, None
    if len({id(layer.module) for layer in layers}) != len(layers):
        return outputs, None
    if any(layer.input is not before.output for before, layer in itertools.pairwise(layers)):
        return outputs, None
    names = {id(m): name for name, m in leaves}
    index = {name: i for i, name in enumerate(flat.names)}
    slices: list[tuple[slice | None, slice | None]] = []
    covered: set[int] = set()
    for layer in layers:
        pair: list[slice | None] = [None, None]
        if isinstance(layer.module, _AFFINE):
            prefix = names[id(layer.module)]
            for k, attribute in enumerate(("weight", "bias")):
                own = layer.module._parameters.get(attribute)
                if own is None or not own.requires_grad:
                    continue  # not trained: a constant of the chain
                i = index.get(f"{prefix}.{attribute}" if prefix else attribute)
                if i is None:
                    return outputs, None  # a parameter shared with another module: keep generic
                pair[k] = slice(flat.offsets[i], flat.offsets[i + 1])
                covered.add(i)
        slices.append((pair[0], pair[1]))
    if len(covered) != len(flat.names):
        # A trained parameter outside the chain's layers (used by the model's own forward,
        # or not at all) would be missing from J v: keep generic.
        return outputs, None
    return outputs, LayerChain(layers, slices)
