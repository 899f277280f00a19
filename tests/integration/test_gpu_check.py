"""The GPU check's dry run: what ``benchmarks/gpu_check.sh`` does without a GPU must keep working.

The check runs on a lent GPU machine only now and then; this test runs its dry run
(forced, so it stays a dry run on a GPU machine too): every CPU step passes, the
script says when there is no GPU, exits 0, and writes the one result file with every
section the GPU run fills.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "GPU_CHECK_MODE": "auto" if not torch.cuda.is_available() else "dry",
        "GPU_CHECK_INSTALL": "0",
        "TMPDIR": str(tmp_path),
    }
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    if not torch.cuda.is_available():
        assert "gpu_check: no GPU: torch.cuda.is_available() is False" in done.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    for key in ("mode", "steps", "environment", "tests", "kernels", "hvp", "collectives", "training", "goals"):
        assert key in report, key
    assert report["mode"] == "dry"
    assert {step["name"]: step["status"] for step in report["steps"]} == {
        "install": "skipped",
        "env": "ok",
        "data": "ok",
        "tests": "ok",
        "kernels_float32": "ok",
        "hvp": "ok",
        "collectives": "ok",
        "train_cnn-small_apts-d_cpu": "ok",
        "train_cnn-small_hf_cpu": "ok",
    }
    assert report["environment"]["torch"]["version"] == str(torch.__version__)
    assert report["tests"]["gpu"]["passed"] > 0 and report["tests"]["gpu"]["failures"] == 0
    assert report["kernels"]["float32"]["devices"]["cpu"]["rows"]
    assert report["hvp"]["results"] and all(row["correct"] for row in report["collectives"]["rows"])
    runs = report["training"]["runs"]
    assert set(runs) == {"cnn-small_apts-d_cpu", "cnn-small_hf_cpu"}
    assert all(run["steps"] == 1 and run["attributes"]["world_size"] == 2 for run in runs.values())
    # Without a GPU every goal is reported, as not measured.
    assert len(report["goals"]) >= 7 and {goal["status"] for goal in report["goals"]} == {"not measured"}
    assert (out / "gpu_check.log").stat().st_size > 0 and (out / "gpu_check_files.tar.gz").exists()
