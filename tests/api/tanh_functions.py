"""tanh as custom ``autograd.Function``s, for the tests of models that torch.func cannot transform."""

from __future__ import annotations

import torch
from torch import Tensor


class LegacyTanh(torch.autograd.Function):
    """tanh as an autograd.Function in the old style (forward takes ctx): twice differentiable
    by autograd, but torch.func transforms refuse it (no setup_context)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class FusedTanh(LegacyTanh):
    """tanh as a fused kernel whose backward cannot itself be differentiated (no double backward)."""

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        if torch.is_grad_enabled():  # create_graph=True: a second derivative was asked for
            raise RuntimeError("the double backward of this kernel is not implemented")
        return LegacyTanh.backward(ctx, grad)
