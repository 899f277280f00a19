"""Model builders.  Every model is a flat ``nn.Sequential`` so it can be cut into pipeline stages.

Initialisation is PyTorch's default for each layer, so a model is deterministic
given the caller's ``torch.manual_seed``.
"""

from __future__ import annotations

import itertools

from torch import nn


def mlp() -> nn.Sequential:
    """MNIST multilayer perceptron 784 -> 128 -> 64 -> 10 with ReLU."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def cnn_small() -> nn.Sequential:
    """Small MNIST CNN without batch norm or dropout (deterministic in train and eval mode).

    Spatial sizes: 28 -(5x5)-> 24 -(pool)-> 12 -(5x5)-> 8 -(pool)-> 4, so 32*4*4 = 512 features.
    """
    return _small_cnn(batch_norm=False)


def cnn_small_bn() -> nn.Sequential:
    """``cnn_small`` with batch norm after each convolution (46 826 parameters).

    Batch norm makes the loss invariant to the scale of each convolution's weights, as in
    the ResNets of the Neumann optimizer's paper, at ``cnn_small``'s cost
    (docs/results-large-batch.md, "Batch norm: what it does for Neumann at batch 15 000").
    """
    return _small_cnn(batch_norm=True)


def _small_cnn(batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in ((1, 16), (16, 32)):
        layers.append(nn.Conv2d(c_in, c_out, kernel_size=5))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
    layers += [nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def cnn() -> nn.Sequential:
    """The APTS thesis MNIST network: three conv/BN/ReLU/pool blocks, a 256-unit dense layer, dropout.

    Spatial sizes: 28 -> 14 -> 7 -> 3 (3x3 convolutions with padding 1 keep the size;
    each 2x2 max-pool halves it, rounding down), so 128*3*3 = 1152 features.
    """
    layers: list[nn.Module] = []
    channels = [1, 32, 64, 128]
    for c_in, c_out in itertools.pairwise(channels):
        layers += [
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
    layers += [
        nn.Flatten(),
        nn.Linear(128 * 3 * 3, 256),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(256, 10),
    ]
    return nn.Sequential(*layers)


def pinn_mlp(in_dim: int, width: int, depth: int, out_dim: int = 1) -> nn.Sequential:
    """Tanh MLP for PINNs: ``depth`` hidden layers of ``width`` units.

    Tanh, not ReLU, because the PDE residual needs nonzero second derivatives.
    """
    if depth < 1 or width < 1:
        raise ValueError(f"pinn_mlp: depth and width must be >= 1, got depth={depth} width={width}")
    layers: list[nn.Module] = [nn.Linear(in_dim, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def linear(in_dim: int, out_dim: int = 1) -> nn.Sequential:
    """A single affine layer (parameters: weight ``(out_dim, in_dim)`` then bias)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim))
