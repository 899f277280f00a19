"""Validation metrics are taken with the model in eval mode: dropout off, batch norm on its running statistics."""

from __future__ import annotations

import pytest
import torch

from hpcopt.optimizers import SGD, make_config
from hpcopt.problems import make_problem
from hpcopt.problems.base import Dataset
from tests.conftest import make_objective, mnist_dir

pytestmark = pytest.mark.timeout(120)


@pytest.mark.mpi(min_size=1)
def test_evaluation_of_the_cnn_is_in_eval_mode_and_changes_no_buffer() -> None:
    problem = make_problem("mnist", data_dir=str(mnist_dir()), options={"limit": 400})
    objective = make_objective(problem, model="cnn")
    flat = objective.flat
    problem.val = Dataset(problem.val.inputs[:200], problem.val.targets[:200])
    optimizer = SGD(objective, make_config("sgd", {"lr": 0.05}))
    optimizer.step()  # the batch-norm running statistics move away from their initial values
    buffers = {name: value.clone() for name, value in flat.model.named_buffers()}
    first, second = optimizer.evaluate(problem), optimizer.evaluate(problem)
    assert first == second  # dropout active would draw new masks for the second call
    for name, value in flat.model.named_buffers():
        assert torch.equal(value, buffers[name]), f"evaluation changed {name}"
    assert all(module.training for module in flat.model.modules())  # training mode restored
    # The reference: the module itself in eval mode on the whole validation set (P = 1 rows).
    if objective.comm.size == 1:
        flat.model.eval()
        with torch.no_grad():
            reference = problem.eval_metrics(problem.eval_sums(flat.model, problem.val).to(torch.float64))
        flat.model.train()
        assert first == pytest.approx(reference, rel=1e-6)
