"""Tests of hpcopt.problems: IDX reading, MNIST loading, models, the Poisson PINN and synthetic problems."""

from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from hpcopt.errors import ConfigError, DataError
from hpcopt.problems import PROBLEMS, Dataset, make_problem, models
from hpcopt.problems.mnist.idx import read_idx, write_idx
from hpcopt.problems.mnist.problem import MNIST_MEAN, MNIST_STD
from hpcopt.problems.pinn.poisson import PoissonProblem, exact_solution
from hpcopt.problems.synthetic import LogisticProblem, QuadraticProblem


def mnist_dir() -> Path:
    """The real MNIST folder: ``$HPCOPT_DATA_DIR/mnist`` or ``<repo>/../shared/datasets/mnist``; else skip."""
    candidates = []
    if os.environ.get("HPCOPT_DATA_DIR"):
        candidates.append(Path(os.environ["HPCOPT_DATA_DIR"]) / "mnist")
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "datasets" / "mnist")
    for folder in candidates:
        if any(folder.glob("t10k-images-idx3-ubyte*")):
            return folder
    pytest.skip(f"MNIST not found at {', '.join(map(str, candidates))}; set HPCOPT_DATA_DIR")


def exact_net(points: torch.Tensor) -> torch.Tensor:
    """The exact Poisson solution as a ``net`` mapping (n, d) -> (n, 1)."""
    return exact_solution(points).unsqueeze(-1)


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path: Path, compress: bool, dtype: type[np.generic]) -> None:
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    path = tmp_path / "a.idx"
    write_idx(path, array, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    back = read_idx(path)
    assert back.dtype == array.dtype and back.shape == (2, 3, 5)
    np.testing.assert_array_equal(back, array)


def test_idx_reads_hand_written_bytes_and_detects_gzip_by_content(tmp_path: Path) -> None:
    # Written from the format description, independent of write_idx: int16, 2x2, big-endian.
    raw = bytes([0, 0, 0x0B, 2]) + struct.pack(">II", 2, 2) + struct.pack(">4h", 1, -2, 300, -400)
    plain_named_gz = tmp_path / "plain.gz"
    plain_named_gz.write_bytes(raw)
    gz_named_plain = tmp_path / "compressed-idx1-ubyte"
    gz_named_plain.write_bytes(gzip.compress(raw))
    for path in (plain_named_gz, gz_named_plain):
        np.testing.assert_array_equal(read_idx(path), np.array([[1, -2], [300, -400]], dtype=np.int16))


def _header(code: int, dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (_header(0x08, (10, 28, 28)) + bytes(123), "truncated: header says 10x28x28 uint8 = 7840 bytes, file has 123"),
        (_header(0x08, (2, 2)) + bytes(5), "trailing data: header says 2x2 uint8 = 4 bytes, file has 5"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + bytes(1), "not an IDX file: magic number starts with 0100"),
        (_header(0x07, (1,)) + bytes(1), "unknown dtype code 0x07"),
        (bytes([0, 0, 0x08, 3]) + struct.pack(">I", 5), "truncated: header declares 3 dimensions (16 header bytes)"),
        (b"\x00\x00", "truncated: 2 bytes, shorter than the 4-byte IDX magic number"),
        (gzip.compress(_header(0x08, (4,)) + bytes(4))[:-6], "corrupt or truncated gzip data"),
    ],
    ids=["truncated", "trailing", "magic", "dtype", "short-header", "tiny", "gzip-cut"],
)
def test_idx_corruption_raises_data_error(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_idx(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_idx_unreadable_path_raises_data_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "nope" if kind == "missing" else tmp_path
    with pytest.raises(DataError, match=r"cannot read"):
        read_idx(path)


# ---------------------------------------------------------------- MNIST


def _write_split(folder: Path, prefix: str, n_images: int, n_labels: int, compress: bool = True) -> None:
    suffix = ".gz" if compress else ""
    rng = np.random.default_rng(n_images)
    images = rng.integers(0, 256, size=(n_images, 28, 28), dtype=np.uint8)
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress=compress)
    write_idx(
        folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n_labels, dtype=np.uint8) % 10, compress=compress
    )


def test_mnist_real_data_split_and_normalisation() -> None:
    folder = mnist_dir()
    problem = make_problem("mnist", data_dir=str(folder))
    assert (len(problem.train), len(problem.val)) == (8000, 2000)
    assert problem.train.inputs.shape == (8000, 1, 28, 28) and problem.train.inputs.dtype == torch.float32
    assert problem.train.targets.dtype == torch.int64
    assert set(problem.train.targets.tolist()) == set(range(10))
    # t10k pixel statistics are close to the training-set constants used for normalising.
    assert abs(problem.train.inputs.mean().item()) < 0.02
    assert abs(problem.train.inputs.std().item() - 1.0) < 0.02
    # Validation is the *last* 2000 t10k images, in order.
    raw = read_idx(next(folder.glob("t10k-images-idx3-ubyte*")))
    expected = (torch.from_numpy(raw[8000].astype(np.float32)) / 255 - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(problem.val.inputs[0, 0], expected)
    # The parent folder works too (the files are found in its mnist/ subfolder); limit trims train only.
    limited = make_problem("mnist", data_dir=str(folder.parent), options={"limit": 100})
    assert (len(limited.train), len(limited.val)) == (100, 2000)
    torch.testing.assert_close(limited.train.inputs, problem.train.inputs[:100])


def test_mnist_full_set_uses_train_files(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", 7, 7, compress=False)
    _write_split(tmp_path, "t10k", 3, 3)
    problem = make_problem("mnist", data_dir=str(tmp_path))
    assert (len(problem.train), len(problem.val)) == (7, 3)
    assert problem.train.targets.tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_mnist_missing_data_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"does not exist \(set it with --data-dir\)"):
        make_problem("mnist", data_dir=str(tmp_path / "absent"))
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(DataError, match=r"is a file, not a directory"):
        make_problem("mnist", data_dir=str(tmp_path / "a-file"))
    with pytest.raises(DataError, match=r"no t10k-images-idx3-ubyte\[\.gz\] in .*--data-dir"):
        make_problem("mnist", data_dir=str(tmp_path))
    monkeypatch.delenv("HPCOPT_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"--data-dir"):
        make_problem("mnist")
    _write_split(tmp_path, "t10k", 3, 3)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\[\.gz\] not found"):
        make_problem("mnist", data_dir=str(tmp_path))


def test_mnist_count_mismatch_and_bad_limit(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", 5, 4)
    _write_split(tmp_path, "t10k", 3, 3)
    with pytest.raises(DataError, match=r"5 images but .*train-labels.* has 4 labels"):
        make_problem("mnist", data_dir=str(tmp_path))
    _write_split(tmp_path, "train", 5, 5)
    with pytest.raises(ConfigError, match=r"limit=6"):
        make_problem("mnist", data_dir=str(tmp_path), options={"limit": 6})


def test_mnist_eval_sums_add_over_slices_and_restore_mode(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", 4, 4)
    _write_split(tmp_path, "t10k", 9, 9)
    problem = make_problem("mnist", data_dir=str(tmp_path))
    torch.manual_seed(0)
    net = problem.build_model("cnn")
    assert isinstance(net, nn.Sequential)
    norm = net[1]
    assert isinstance(norm, nn.BatchNorm2d) and norm.running_mean is not None
    net.train()
    net[1].eval()  # a deliberately frozen batch norm must stay frozen
    running_mean = norm.running_mean.clone()
    whole = problem.eval_sums(net, problem.val)
    parts = problem.eval_sums(net, problem.val.subset(slice(0, 4))) + problem.eval_sums(
        net, problem.val.subset(slice(4, 9))
    )
    assert whole.dtype == torch.float64 and whole.shape == (3,) and whole[2] == 9
    torch.testing.assert_close(whole, parts)
    assert net.training and net[0].training and not net[1].training
    torch.testing.assert_close(norm.running_mean, running_mean)
    metrics = problem.eval_metrics(whole)
    logits = problem.forward(net.eval(), problem.val.inputs)
    loss = problem.criterion(logits, problem.val.targets).item()
    assert math.isclose(metrics["val_loss"], loss, rel_tol=1e-5)
    assert metrics["val_accuracy"] == (logits.argmax(1) == problem.val.targets).sum().item() / 9


# ---------------------------------------------------------------- models


def _count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_model_shapes_and_parameter_counts() -> None:
    torch.manual_seed(0)
    images = torch.randn(3, 1, 28, 28)
    expected = {
        "mlp": (784 * 128 + 128) + (128 * 64 + 64) + (64 * 10 + 10),
        "cnn-small": (16 * 25 + 16) + (32 * 16 * 25 + 32) + (512 * 64 + 64) + (64 * 10 + 10),
        "cnn-small-bn": (16 * 25 + 16 + 2 * 16) + (32 * 16 * 25 + 32 + 2 * 32) + (512 * 64 + 64) + (64 * 10 + 10),
        "cnn": (32 * 9 + 32 + 2 * 32)
        + (64 * 32 * 9 + 64 + 2 * 64)
        + (128 * 64 * 9 + 128 + 2 * 128)
        + (1152 * 256 + 256)
        + (256 * 10 + 10),
    }
    builders = {
        "mlp": models.mlp,
        "cnn-small": models.cnn_small,
        "cnn-small-bn": models.cnn_small_bn,
        "cnn": models.cnn,
    }
    for name, count in expected.items():
        net = builders[name]().eval()
        assert isinstance(net, nn.Sequential)
        assert _count(net) == count, name
        assert net(images).shape == (3, 10), name
    pinn = models.pinn_mlp(2, 16, 3)
    assert _count(pinn) == (2 * 16 + 16) + 2 * (16 * 16 + 16) + (16 + 1)
    assert pinn(torch.rand(5, 2)).shape == (5, 1)
    assert [p.shape for p in models.linear(7, 1).parameters()] == [(1, 7), (1,)]


def test_build_model_is_seeded_and_rejects_unknown_names() -> None:
    problem = make_problem("poisson1d")
    torch.manual_seed(3)
    first = nn.utils.parameters_to_vector(problem.build_model().parameters())
    torch.manual_seed(3)
    second = nn.utils.parameters_to_vector(problem.build_model("pinn-mlp").parameters())
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    expected = r"unknown model 'cnn' for problem 'poisson1d' \(choose from pinn-mlp\)"
    with pytest.raises(ConfigError, match=expected):
        problem.build_model("cnn")


# ---------------------------------------------------------------- Poisson PINN


@pytest.mark.parametrize("name", ["poisson1d", "poisson2d"])
def test_poisson_exact_solution_has_zero_residual(name: str) -> None:
    problem = make_problem(name, seed=1)
    assert isinstance(problem, PoissonProblem)
    dim = problem.dim
    inputs, targets = problem.train.inputs, problem.train.targets
    boundary = inputs[:, dim] == 1.0
    # poisson1d trains full-batch, poisson2d on batches of 600 of its 2400 rows (their train defaults).
    assert problem.default_batch_size == {"poisson1d": len(problem.train), "poisson2d": 600}[name]
    # Boundary points lie on a face of the cube; interior points inside it.
    on_face = ((inputs[:, :dim] == 0) | (inputs[:, :dim] == 1)).any(dim=1)
    assert torch.equal(on_face, boundary) and boundary.any() and (~boundary).any()
    outputs = problem.forward(exact_net, inputs)
    assert outputs.shape == targets.shape == (len(inputs),)
    interior_error = (outputs - targets)[~boundary].abs().max() / targets[~boundary].abs().max()
    assert interior_error < 1e-4
    assert outputs[boundary].abs().max() < 1e-6
    assert problem.criterion(outputs, targets) < 1e-8
    metrics = problem.eval_metrics(problem.eval_sums(exact_net, problem.val))
    assert metrics["val_rel_l2_error"] < 1e-5 and metrics["val_loss"] < 1e-10
    # Residual-style rows are evaluated too (training set), still ~0 for the exact solution.
    assert problem.eval_metrics(problem.eval_sums(exact_net, problem.train))["val_rel_l2_error"] < 1e-5


def test_poisson_untrained_net_has_large_error_and_validation_grid() -> None:
    problem = make_problem("poisson2d", options={"val_grid": 11, "interior": 50, "boundary": 8})
    assert (len(problem.train), len(problem.val)) == (58, 121)
    torch.manual_seed(0)
    metrics = problem.eval_metrics(problem.eval_sums(problem.build_model(), problem.val))
    assert metrics["val_rel_l2_error"] > 0.1


def _poisson_setup() -> tuple[PoissonProblem, nn.Module, dict[str, torch.Tensor], Dataset]:
    problem = make_problem("poisson2d", options={"interior": 12, "boundary": 4, "width": 8, "depth": 2})
    assert isinstance(problem, PoissonProblem)
    torch.manual_seed(0)
    net = problem.build_model().double()
    params = {k: v.detach() for k, v in net.named_parameters()}
    data = Dataset(problem.train.inputs.double(), problem.train.targets.double())
    return problem, net, params, data


def test_poisson_forward_jvp_matches_finite_differences() -> None:
    problem, net, params, data = _poisson_setup()
    torch.manual_seed(1)
    direction = {k: torch.randn_like(v) for k, v in params.items()}

    def outputs(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return problem.forward(lambda x: functional_call(net, p, (x,)), data.inputs)

    result = torch.func.jvp(outputs, (params,), (direction,))
    assert len(result) == 2  # (outputs, tangent): no auxiliary output
    _, tangent = result
    assert tangent.shape == (len(data),) and torch.isfinite(tangent).all()
    step = 1e-6
    plus = outputs({k: v + step * direction[k] for k, v in params.items()})
    minus = outputs({k: v - step * direction[k] for k, v in params.items()})
    torch.testing.assert_close(tangent, (plus - minus) / (2 * step), rtol=1e-6, atol=1e-7)


def test_poisson_double_backward_hvp_matches_finite_differences() -> None:
    problem, net, params, data = _poisson_setup()
    names = list(params)
    torch.manual_seed(2)
    direction = [torch.randn_like(params[k]) for k in names]

    def gradient(values: list[torch.Tensor], create_graph: bool) -> tuple[torch.Tensor, ...]:
        p = dict(zip(names, values, strict=True))
        loss = problem.criterion(problem.forward(lambda x: functional_call(net, p, (x,)), data.inputs), data.targets)
        return torch.autograd.grad(loss, values, create_graph=create_graph)

    leaves = [params[k].clone().requires_grad_() for k in names]
    grads = gradient(leaves, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, direction, strict=True))
    assert isinstance(dot, torch.Tensor)
    hvp = torch.autograd.grad(dot, leaves)
    step = 1e-5
    shifted = [
        [(params[k] + sign * step * v).requires_grad_() for k, v in zip(names, direction, strict=True)]
        for sign in (1, -1)
    ]
    plus, minus = (gradient(values, create_graph=False) for values in shifted)
    for exact, high, low in zip(hvp, plus, minus, strict=True):
        torch.testing.assert_close(exact, (high - low) / (2 * step), rtol=1e-5, atol=1e-6)


def test_poisson_forward_composes_with_func_grad_and_vmap() -> None:
    problem, net, params, data = _poisson_setup()

    def row_loss(p: dict[str, torch.Tensor], row: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = problem.forward(lambda x: functional_call(net, p, (x,)), row.unsqueeze(0))
        return problem.criterion(out, target.unsqueeze(0))

    per_row_grad = torch.func.vmap(torch.func.grad(row_loss), in_dims=(None, 0, 0))
    per_row = per_row_grad(params, data.inputs, data.targets)
    for k, v in params.items():
        assert per_row[k].shape == (len(data), *v.shape)
    # The mean of per-row gradients is the full-batch gradient computed by ordinary autograd.
    loss = problem.criterion(problem.forward(net, data.inputs), data.targets)
    full = dict(zip(params, torch.autograd.grad(loss, list(net.parameters())), strict=True))
    for k in params:
        torch.testing.assert_close(per_row[k].mean(0), full[k])


# ---------------------------------------------------------------- synthetic


@pytest.mark.parametrize("name", ["quadratic", "logistic"])
def test_synthetic_exact_minimizer_zeroes_the_gradient(name: str) -> None:
    problem = make_problem(name, seed=4, options={"n": 300, "n_val": 50, "dim": 6})
    assert isinstance(problem, (QuadraticProblem, LogisticProblem))
    assert problem.default_batch_size == 300 and len(problem.val) == 50
    minimizer = problem.exact_minimizer()
    assert minimizer.dtype == torch.float64 and minimizer.shape == (7,)
    net = problem.build_model().double()
    nn.utils.vector_to_parameters(minimizer, net.parameters())
    inputs, targets = problem.train.inputs.double(), problem.train.targets.double()
    loss = problem.criterion(problem.forward(net, inputs), targets)
    gradient = torch.autograd.grad(loss, list(net.parameters()))
    assert max(g.abs().max().item() for g in gradient) < 1e-7
    # It is a minimum, not just a stationary point: a perturbation raises the loss.
    nn.utils.vector_to_parameters(minimizer + 1e-2, net.parameters())
    perturbed = problem.criterion(problem.forward(net, inputs), targets)
    assert perturbed > loss
    metrics = problem.eval_metrics(problem.eval_sums(net.float(), problem.val))
    assert set(metrics) == {"val_loss", problem.metric_name}


def test_quadratic_minimizer_matches_normal_equations_and_metric() -> None:
    problem = make_problem("quadratic", options={"n": 200, "dim": 4, "noise": 0.0})
    assert isinstance(problem, QuadraticProblem)
    design = torch.cat([problem.train.inputs.double(), torch.ones(200, 1, dtype=torch.float64)], dim=1)
    targets = problem.train.targets.double()
    expected = torch.linalg.solve(design.T @ design, design.T @ targets)
    torch.testing.assert_close(problem.exact_minimizer(), expected)
    net = problem.build_model()
    nn.utils.vector_to_parameters(problem.exact_minimizer().float(), net.parameters())
    # Noise-free targets: the teacher is recovered, so the held-out relative error is ~0.
    assert problem.eval_metrics(problem.eval_sums(net, problem.val))["val_rel_error"] < 1e-5


def test_synthetic_data_follow_the_seed() -> None:
    first, again, other = (make_problem("logistic", seed=s, options={"n": 50}) for s in (1, 1, 2))
    assert torch.equal(first.train.inputs, again.train.inputs)
    assert not torch.equal(first.train.inputs, other.train.inputs)
    assert set(first.train.targets.tolist()) == {0.0, 1.0}


def test_logistic_separable_data_is_a_clear_error() -> None:
    problem = make_problem("logistic", options={"n": 5, "dim": 10})
    assert isinstance(problem, LogisticProblem)
    with pytest.raises(ConfigError, match=r"separable"):
        problem.exact_minimizer()


# ---------------------------------------------------------------- registry


def test_make_problem_errors_and_option_parsing() -> None:
    assert list(PROBLEMS) == [
        "mnist",
        "poisson1d",
        "poisson2d",
        "poisson3d",
        "allen-cahn",
        "allen-cahn-time",
        "tinyshakespeare",
        "quadratic",
        "logistic",
    ]
    with pytest.raises(ConfigError) as info:
        make_problem("x")
    choices = (
        "mnist, poisson1d, poisson2d, poisson3d, allen-cahn, allen-cahn-time, tinyshakespeare, quadratic, logistic"
    )
    assert str(info.value) == (
        f"unknown problem 'x' (choose from {choices}; or MODULE:ATTR, path/to/file.py:ATTR for a problem of your own)"
    )
    unknown = r"unknown option 'widht' for problem 'poisson1d' \(choose from .*width"
    with pytest.raises(ConfigError, match=unknown):
        make_problem("poisson1d", options={"widht": 4})
    with pytest.raises(ConfigError, match=r"option n=True: expected int"):
        make_problem("quadratic", options={"n": True})
    with pytest.raises(ConfigError, match=r"option dim='two': expected int"):
        make_problem("quadratic", options={"dim": "two"})
    with pytest.raises(ConfigError, match=r"interior=0: must be >= 1"):
        make_problem("poisson2d", options={"interior": 0})
    # Text values from the command line are parsed with the option's type.
    problem = make_problem("quadratic", options={"n": "40", "noise": "0"})
    assert len(problem.train) == 40


def test_problem_descriptors() -> None:
    cases = [
        ("poisson1d", "val_rel_l2_error", False),
        ("quadratic", "val_rel_error", False),
        ("logistic", "val_accuracy", True),
    ]
    for name, metric, higher in cases:
        problem = make_problem(name)
        assert (problem.name, problem.metric_name, problem.metric_higher_is_better) == (name, metric, higher)
        assert problem.default_model in problem.models
        assert problem.train.inputs.dtype == torch.float32
