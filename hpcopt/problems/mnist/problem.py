"""MNIST digit classification from the original IDX files.

Options: :class:`MnistOptions` (``hpcopt options mnist``).

Data layout: ``data_dir`` (or ``data_dir/mnist``) holds ``t10k-images-idx3-ubyte[.gz]``
and ``t10k-labels-idx1-ubyte[.gz]`` and, optionally, the ``train-`` pair.  With both
pairs the split is the standard 60000 train / 10000 val; with only the t10k pair it
is the first 8000 t10k samples for training and the last 2000 for validation.
Without ``data_dir`` the ``HPCOPT_DATA_DIR`` environment variable is used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcopt.errors import ConfigError, DataError
from hpcopt.problems import models
from hpcopt.problems.base import Dataset, Net, Problem, ProblemOptions, as_sums, build_options, evaluation_mode
from hpcopt.problems.defaults import TrainingDefaults
from hpcopt.problems.mnist.idx import read_idx

#: Mean and standard deviation of the 60000 MNIST training pixels (scaled to [0, 1]).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

#: Samples of the t10k set used for training when the train files are absent.
T10K_TRAIN = 8000

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class MnistOptions(ProblemOptions):
    """Options of ``mnist``.

    Attributes:
        limit: use only the first ``limit`` training samples (``None``: all of them).
    """

    problem: ClassVar[str] = "mnist"
    # Measured in docs/problems.md ("Defaults for train"): on the 8 000-image split APTS-D
    # passes 97 % after ~50 s on one core with batches of 400 (which divide evenly across
    # 2, 4 and 8 ranks) and a first radius of 0.5; with its own defaults (Δ₀ = 0.1) and
    # batches of 1000 it was at 95 % after two minutes.  The time limit ends the run on
    # the full 60 000-image set, where one epoch alone takes about a minute.
    train_defaults: ClassVar[TrainingDefaults] = TrainingDefaults(
        epochs=15, batch_size=400, time_limit=100, optimizer_options={"apts-d": {"radius": 0.5}}
    )

    limit: int | None = None


#: The MNIST models by name (``--model``).
MODELS = {"mlp": models.mlp, "cnn-small": models.cnn_small, "cnn-small-bn": models.cnn_small_bn, "cnn": models.cnn}


class MnistProblem(Problem):
    """Ten-class classification of 28x28 digits with a cross-entropy loss."""

    name = "mnist"
    metric_name = "val_accuracy"
    metric_higher_is_better = True
    default_model = "cnn-small"
    models = tuple(MODELS)

    def __init__(
        self, *, data_dir: str | None = None, seed: int = 0, options: Mapping[str, object] | None = None
    ) -> None:
        del seed  # the split is fixed, so the seed has nothing to choose
        opts = build_options(MnistOptions, options)
        folder = find_mnist_dir(data_dir)
        self.data_dir = folder
        test_images, test_labels = _load_pair(folder, "t10k")
        if _find(folder, _FILES["train"][0]) is not None or _find(folder, _FILES["train"][1]) is not None:
            train_images, train_labels = _load_pair(folder, "train")
            self.train = Dataset(train_images, train_labels)
            self.val = Dataset(test_images, test_labels)
        else:
            if len(test_labels) <= T10K_TRAIN:
                raise DataError(
                    f"{folder}: the t10k set has {len(test_labels)} samples; at least {T10K_TRAIN + 1} are "
                    "needed to split it into train and val without the train- files"
                )
            self.train = Dataset(test_images[:T10K_TRAIN], test_labels[:T10K_TRAIN])
            self.val = Dataset(test_images[T10K_TRAIN:], test_labels[T10K_TRAIN:])
        limit = opts.limit
        if limit is not None:
            if not 1 <= limit <= len(self.train):
                raise ConfigError(
                    f"problem 'mnist' option limit={limit}: must be between 1 and the "
                    f"{len(self.train)} training samples available"
                )
            self.train = self.train.subset(slice(0, limit))
        self.default_batch_size = opts.train_defaults.batch_for(len(self.train))

    def _make_model(self, name: str) -> nn.Module:
        return MODELS[name]()

    def forward(self, net: Net, inputs: Tensor) -> Tensor:
        return net(inputs)

    def criterion(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets)

    def eval_sums(self, net: Net, data: Dataset) -> Tensor:
        """``[loss_sum, correct, count]`` over ``data``."""
        loss_sum, correct = 0.0, 0
        with torch.no_grad(), evaluation_mode(net):
            for chunk in data.chunks():
                logits = net(chunk.inputs)
                loss_sum += F.cross_entropy(logits, chunk.targets, reduction="sum").item()
                correct += int((logits.argmax(dim=1) == chunk.targets).sum())
        return as_sums(loss_sum, correct, len(data))

    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        loss_sum, correct, count = sums.tolist()
        count = max(count, 1.0)  # an empty slice on every rank would otherwise divide by zero
        return {"val_loss": loss_sum / count, "val_accuracy": correct / count}


def find_mnist_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """The folder holding the t10k files: ``data_dir`` itself or its ``mnist`` subfolder.

    Raises:
        DataError: no folder given, the folder is missing, or the t10k files are not in it.
    """
    if data_dir is None:
        data_dir = os.environ.get("HPCOPT_DATA_DIR")
        if not data_dir:
            raise DataError(
                "mnist: no data directory: pass --data-dir DIR (a folder holding "
                "t10k-images-idx3-ubyte[.gz]) or set HPCOPT_DATA_DIR"
            )
    root = Path(data_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"mnist: --data-dir {root} is a file, not a directory (give the folder that holds it)")
    if not root.is_dir():
        raise DataError(f"mnist: data directory {root} does not exist (set it with --data-dir)")
    for folder in (root, root / "mnist"):
        if _find(folder, _FILES["t10k"][0]) is not None:
            return folder
    raise DataError(
        f"mnist: no {_FILES['t10k'][0]}[.gz] in {root} or {root / 'mnist'} (set the folder with --data-dir)"
    )


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_pair(folder: Path, split: str) -> tuple[Tensor, Tensor]:
    """Normalised images ``(N, 1, 28, 28)`` float32 and int64 labels of one split, checked."""
    image_stem, label_stem = _FILES[split]
    image_path, label_path = _find(folder, image_stem), _find(folder, label_stem)
    for stem, path in ((image_stem, image_path), (label_stem, label_path)):
        if path is None:
            raise DataError(f"mnist: {stem}[.gz] not found in {folder} (set the folder with --data-dir)")
    assert image_path is not None and label_path is not None
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(f"{image_path}: expected uint8 images Nx28x28, found {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{label_path}: expected a uint8 label vector, found {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{image_path}: {len(images)} images but {label_path} has {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{label_path}: label {int(labels.max())} is outside 0..9")
    pixels = torch.from_numpy(images).to(torch.float32).div_(255.0)
    pixels = pixels.sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)
    return pixels, torch.from_numpy(labels).to(torch.int64)
