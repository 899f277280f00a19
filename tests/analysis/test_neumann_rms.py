"""``benchmarks/neumann_rms.py``: Neumann's algorithm on the gradient scaled by its running RMS (a diagnostic)."""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hpcopt
from hpcopt.errors import ConfigError
from hpcopt.optimizers import OPTIMIZERS
from tests.conftest import benchmark_script


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_the_first_burn_in_step_moves_each_coordinate_by_lr_times_the_sign_of_its_gradient() -> None:
    # v̂ = ĝ² after one step (bias correction), so the scaled gradient is ĝ/(|ĝ| + ε): the
    # SGD burn-in's first step is -lr·sign(ĝ) where |ĝ| ≫ ε, whatever each coordinate's scale.
    script = benchmark_script("neumann_rms")
    inputs, targets = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3
    lr = 0.05
    options: dict[str, Any] = {
        "lr": lr,
        "epoch_steps": 4,
        "warmup_epochs": 1,
        "reset_epochs": 2,
        "beta_rule": "relative",
    }

    model = _model()
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    loss = F.cross_entropy(model(inputs), targets)
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])
    with script.registered():
        opt = hpcopt.optimizer("neumann-rms", model, F.cross_entropy, **options)
    assert "neumann-rms" not in OPTIMIZERS  # known only while the diagnostic makes its optimizer
    opt.step(inputs, targets)
    assert opt.last is not None and opt.last.extras["phase"] == "sgd"
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    large = grad.abs() > 1e-5
    assert large.sum() > 0.9 * grad.numel()
    torch.testing.assert_close(moved[large], -lr * grad[large].sign(), rtol=1e-3, atol=1e-6)

    # the plain optimizer on the same batch moves by -lr·ĝ: the scaling is the only difference
    plain_model = _model()
    plain = hpcopt.optimizer("neumann", plain_model, F.cross_entropy, **options)
    plain.step(inputs, targets)
    plain_moved = torch.cat([p.detach().flatten() for p in plain_model.parameters()]) - before
    torch.testing.assert_close(plain_moved, -lr * grad, rtol=1e-4, atol=1e-7)


def test_importing_the_diagnostic_does_not_make_it_an_optimizer_of_hpcopt() -> None:
    benchmark_script("neumann_rms")
    with pytest.raises(ConfigError, match="unknown optimizer 'neumann-rms'"):
        hpcopt.optimizer("neumann-rms", _model(), F.cross_entropy)


def test_set_changes_the_scaled_runs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    script = benchmark_script("neumann_rms")
    rows = torch.Generator().manual_seed(2)
    images = _Rows(torch.randn(64, 1, 28, 28, generator=rows), torch.arange(64) % 10)
    problem = SimpleNamespace(train=images, val=images)
    args = argparse.Namespace(batch=32, epochs=1, model="mlp", seed=0, set=["warmup_epochs=0", "gamma=0.5"])
    made: dict[str, dict[str, object]] = {}
    real = hpcopt.optimizer

    def spy(name: str, *pieces: object, **options: object) -> hpcopt.Optimizer:
        made[name] = options
        return real(name, *pieces, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(hpcopt, "optimizer", spy)
    scaled = script.train("neumann-rms", 0.01, problem, args)
    script.train("neumann", 0.1, problem, args)
    assert scaled.changed == "warmup_epochs=0 gamma=0.5" and len(scaled.accuracy) == 1
    assert made["neumann-rms"]["warmup_epochs"] == "0" and made["neumann-rms"]["gamma"] == "0.5"
    assert made["neumann"]["warmup_epochs"] != "0" and "gamma" not in made["neumann"]  # the control: the study's


def test_a_set_without_a_value_is_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    script = benchmark_script("neumann_rms")
    monkeypatch.setattr(sys, "argv", ["neumann_rms.py", "--set", "warmup_epochs"])
    with pytest.raises(SystemExit) as stopped:
        script.main()
    assert stopped.value.code == 2 and "--set expects key=value, got 'warmup_epochs'" in capsys.readouterr().err


class _Rows:
    """The part of a dataset the diagnostic reads: rows of inputs and targets."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)
