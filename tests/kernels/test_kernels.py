"""Fused vector kernels: the CUDA sources compile, the torch twins compute the stated functions.

CPU (always): every ``kernels/*.cu`` compiles with nvcc for sm_80 and sm_90; the
torch twins equal float64 references of their formulas; a CG built from the
fused step and direction update reproduces :func:`hpcopt.numerics.krylov.cg.cg`.
GPU (skipped without one): each CUDA kernel equals its twin on fresh random
inputs, with the outputs poisoned (NaN) before the launch.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcopt.kernels import CpuKernels, neumann_coefficient, select_backend
from hpcopt.kernels.cuda import KERNEL_FILES, kernel_dir
from hpcopt.numerics.krylov.cg import cg
from tests.kernels.gpu_support import needs_gpu

pytestmark = pytest.mark.timeout(180)

KERNELS = kernel_dir()
CU_FILES = sorted(p.name for p in KERNELS.glob("*.cu"))
twin = CpuKernels()


def _random(n: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=generator, dtype=torch.float64).to(dtype) for _ in range(8)]


# -- the CUDA sources ------------------------------------------------------------


def test_every_cu_file_is_loaded_at_run_time() -> None:
    assert sorted(KERNEL_FILES) == CU_FILES


def test_kernels_and_twins_offer_the_same_functions() -> None:
    source = "\n".join((KERNELS / name).read_text() for name in CU_FILES)
    per_dtype = set(re.findall(r'extern "C" __global__ void (\w+)_##suffix', source))
    twin_methods = {name.rstrip("_") for name in dir(CpuKernels) if not name.startswith("_") and name != "name"}
    assert per_dtype == twin_methods
    assert 'extern "C" __global__ void reduce_partials' in source


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("name", CU_FILES)
def test_cu_file_compiles_for_sm80_and_sm90(name: str, tmp_path: Path) -> None:
    # -fatbin compiles device code only (no host compiler pass): both architectures in one call.
    command = [
        "nvcc",
        f"-I{KERNELS}",
        "-std=c++17",
        "-fatbin",
        "-gencode",
        "arch=compute_80,code=sm_80",
        "-gencode",
        "arch=compute_90,code=sm_90",
        "-Werror",
        "all-warnings",
        str(KERNELS / name),
        "-o",
        str(tmp_path / "out.fatbin"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=170, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.fatbin").stat().st_size > 0


# -- torch twins against float64 references -----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cg_step_equals_the_unfused_sequence(dtype: torch.dtype) -> None:
    x, r, p, ap, *_ = _random(1000, dtype, 1)
    alpha = 0.37
    x_ref, r_ref = x.clone(), r.clone()
    x_ref.add_(p, alpha=alpha)
    r_ref.add_(ap, alpha=-alpha)
    rr = twin.cg_step_(x, r, p, ap, alpha)
    assert torch.equal(x, x_ref) and torch.equal(r, r_ref)
    exact = float(np.dot(r_ref.double().numpy(), r_ref.double().numpy()))
    assert rr == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cg_direction_and_its_dots(dtype: torch.dtype) -> None:
    p, z, w, *_ = _random(777, dtype, 2)
    beta = 0.81
    expected = z.double() + beta * p.double()
    pp, wp = twin.cg_direction_(p, z, w, beta)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(p.double(), expected, rtol=tol, atol=tol)
    assert pp == pytest.approx(float(expected @ expected), rel=tol)
    assert wp == pytest.approx(float(w.double() @ expected), rel=1e-5 if dtype == torch.float32 else 1e-12)


def test_fused_cg_reproduces_krylov_cg() -> None:
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(40, 40, generator=generator, dtype=torch.float64)
    a = q @ q.T + 40 * torch.eye(40, dtype=torch.float64)
    b = torch.randn(40, generator=generator, dtype=torch.float64)
    x, r = torch.zeros(40, dtype=torch.float64), b.clone()
    p, rr = r.clone(), float(r @ r)
    for _ in range(200):
        ap = a @ p
        new_rr = twin.cg_step_(x, r, p, ap, rr / float(p @ ap))
        if new_rr**0.5 <= 1e-10 * float(b.norm()):
            break
        twin.cg_direction_(p, r, r, new_rr / rr)  # unpreconditioned: z = r
        rr = new_rr
    reference = cg(lambda v: a @ v, b, rtol=1e-10)
    assert reference.converged
    torch.testing.assert_close(x, reference.solution, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pack_unpack_round_trip(dtype: torch.dtype) -> None:
    vector, *_ = _random(513, dtype, 4)
    scalars = torch.tensor([2.5, -1.0, 7.0], dtype=dtype)
    out = torch.full((516,), float("nan"), dtype=dtype)
    twin.pack(out, vector, scalars, scale=0.25)
    torch.testing.assert_close(out[:513], 0.25 * vector, rtol=0, atol=0)
    assert torch.equal(out[513:], scalars)
    back, back_scalars = torch.full_like(vector, float("nan")), torch.full_like(scalars, float("nan"))
    twin.unpack(out, back, back_scalars, scale=4.0)
    assert torch.equal(back, vector)  # scaling by powers of two is exact
    assert torch.equal(back_scalars, scalars)


@pytest.mark.parametrize("update", [True, False])
def test_nlcg_preconditioner_and_step_match_the_formulas(update: bool) -> None:
    s, g, g_prev, h_raw, z, d, theta, _ = (t.numpy().copy() for t in _random(300, torch.float64, 5))
    h = np.abs(h_raw) + 0.5
    ys_ref = float((g - g_prev) @ s)
    shs_ref = float((h * s) @ s)
    ts = [torch.from_numpy(v.copy()) for v in (s, g, g_prev, h, z, d, theta)]
    t_s, t_g, t_gp, t_h, t_z, t_d, t_theta = ts
    ys, shs = twin.nlcg_dots(t_s, t_g, t_gp, t_h)
    assert ys == pytest.approx(ys_ref, rel=1e-12) and shs == pytest.approx(shs_ref, rel=1e-12)

    h_new = np.abs(h - (h * s) ** 2 / shs_ref + (g - g_prev) ** 2 / ys_ref) if update else h
    r = -g
    z_new = r / (h_new + 1e-8)
    rz, rz_prev = twin.nlcg_precondition_(t_h, t_z, t_g, t_gp, t_s, ys, shs, update=update)
    np.testing.assert_allclose(t_h.numpy(), h_new, rtol=1e-12)
    np.testing.assert_allclose(t_z.numpy(), z_new, rtol=1e-12)
    assert rz == pytest.approx(float(r @ z_new), rel=1e-12)
    assert rz_prev == pytest.approx(float(r @ z), rel=1e-12)

    beta, step_size = 0.4, 0.05
    d_new = z_new + beta * d
    t_step = torch.full_like(t_s, float("nan"))
    ss = twin.nlcg_step_(t_theta, t_d, t_step, t_z, beta, step_size)
    np.testing.assert_allclose(t_d.numpy(), d_new, rtol=1e-12)
    np.testing.assert_allclose(t_step.numpy(), step_size * d_new, rtol=1e-12)
    np.testing.assert_allclose(t_theta.numpy(), theta + step_size * d_new, rtol=1e-12, atol=1e-15)
    assert ss == pytest.approx(float((step_size * d_new) @ (step_size * d_new)), rel=1e-12)


@pytest.mark.parametrize("same_point", [False, True])
def test_neumann_update_matches_the_formula(same_point: bool) -> None:
    w, v, m, g, *_ = (t.numpy().copy() for t in _random(200, torch.float64, 6))
    if same_point:
        v = w.copy()
    alpha, beta, eta, mu, gamma = 1e-7, 1e-5 * 200, 0.1, 0.9, 0.99
    dist2 = float((w - v) @ (w - v))
    t_w, t_v, t_m, t_g = (torch.from_numpy(x.copy()) for x in (w, v, m, g))
    assert twin.sq_distance(t_w, t_v) == pytest.approx(dist2, rel=1e-12, abs=0.0)
    coef = neumann_coefficient(dist2, alpha, beta)
    if same_point:
        assert coef == 0.0
    else:
        norm = np.sqrt(dist2)
        assert coef == pytest.approx((alpha * norm**2 - beta / norm**2) / norm, rel=1e-12)
    step_sq = twin.neumann_update_(t_w, t_v, t_m, t_g, coef, eta, mu, gamma)
    d = g + coef * (w - v)
    m_new = mu * m - eta * d
    w_new = w + mu * m_new - eta * d
    assert step_sq == pytest.approx(float((w_new - w) @ (w_new - w)), rel=1e-10)
    np.testing.assert_allclose(t_m.numpy(), m_new, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(t_w.numpy(), w_new, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(t_v.numpy(), w_new + gamma * (v - w_new), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trust_region_trial_point(dtype: torch.dtype) -> None:
    theta, s, *_ = _random(257, dtype, 7)
    trial = torch.full_like(theta, float("nan"))
    ss = twin.tr_trial(trial, theta, s)
    assert torch.equal(trial, theta + s)
    assert ss == pytest.approx(float(s.double() @ s.double()), rel=1e-12)


def test_backend_selection_on_cpu_and_without_cupy() -> None:
    assert isinstance(select_backend("cpu"), CpuKernels)
    try:
        import cupy  # noqa: F401
    except ImportError:
        # torch ops run on any device: without CuPy a CUDA rank falls back to the twins.
        assert isinstance(select_backend("cuda"), CpuKernels)
        from hpcopt.errors import ConfigError

        with pytest.raises(ConfigError, match=r"hpcopt\[gpu\]"):
            select_backend("cuda", require_cuda_kernels=True)


# -- GPU: kernel == twin --------------------------------------------------------------


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-30)


@needs_gpu
@pytest.mark.parametrize("n", [1, 1000, 300_001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_kernels_equal_their_twins(dtype: torch.dtype, n: int) -> None:
    from hpcopt.kernels.cuda import CudaKernels

    device = torch.device("cuda", torch.cuda.current_device())
    gpu = CudaKernels(device)
    rel = 1e-6 if dtype == torch.float32 else 1e-12
    cpu = _random(n, dtype, 100 + n)
    cpu[3] = cpu[3].abs() + 0.5  # a positive diagonal h for NLCG
    dev = [t.to(device) for t in cpu]

    def check(name: str, cpu_out: object, gpu_out: object, tensors: list[int]) -> None:
        for i in tensors:
            torch.testing.assert_close(dev[i].cpu(), cpu[i], rtol=rel, atol=rel, msg=f"{name}[{i}] n={n}")
        flat_cpu = cpu_out if isinstance(cpu_out, tuple) else (cpu_out,)
        flat_gpu = gpu_out if isinstance(gpu_out, tuple) else (gpu_out,)
        for a, b in zip(flat_cpu, flat_gpu):
            if a is not None:
                assert _close(float(a), float(b), 1e-6), f"{name} n={n}: {a} vs {b}"

    check("cg_step", twin.cg_step_(*cpu[:4], 0.3), gpu.cg_step_(*dev[:4], 0.3), [0, 1])
    check("cg_direction", twin.cg_direction_(*cpu[4:7], 0.7), gpu.cg_direction_(*dev[4:7], 0.7), [4])
    check("nlcg_dots", twin.nlcg_dots(*cpu[:4]), gpu.nlcg_dots(*dev[:4]), [])
    # h=3, z=4, g=5, g_prev=6, s=0
    args_c, args_d = [cpu[i] for i in (3, 4, 5, 6, 0)], [dev[i] for i in (3, 4, 5, 6, 0)]
    out_c = twin.nlcg_precondition_(*args_c, 2.0, 3.0, update=True)
    check("nlcg_precondition", out_c, gpu.nlcg_precondition_(*args_d, 2.0, 3.0, update=True), [3, 4])
    cpu[7].fill_(float("nan"))
    dev[7].fill_(float("nan"))  # s output poisoned
    out_c = twin.nlcg_step_(cpu[1], cpu[2], cpu[7], cpu[4], 0.5, 0.01)
    check("nlcg_step", out_c, gpu.nlcg_step_(dev[1], dev[2], dev[7], dev[4], 0.5, 0.01), [1, 2, 7])
    check("sq_distance", twin.sq_distance(cpu[0], cpu[1]), gpu.sq_distance(dev[0], dev[1]), [])
    out_c = twin.neumann_update_(cpu[0], cpu[1], cpu[2], cpu[5], 0.01, 0.1, 0.9, 0.99)
    check("neumann_update", out_c, gpu.neumann_update_(dev[0], dev[1], dev[2], dev[5], 0.01, 0.1, 0.9, 0.99), [0, 1, 2])
    cpu[7].fill_(float("nan"))
    dev[7].fill_(float("nan"))
    check("tr_trial", twin.tr_trial(cpu[7], cpu[0], cpu[1]), gpu.tr_trial(dev[7], dev[0], dev[1]), [7])
    scalars_c = torch.tensor([1.5, -2.0], dtype=dtype)
    buf_c = torch.full((n + 2,), float("nan"), dtype=dtype)
    buf_d = buf_c.to(device)
    twin.pack(buf_c, cpu[0], scalars_c, 0.5)
    gpu.pack(buf_d, dev[0], scalars_c.to(device), 0.5)
    torch.testing.assert_close(buf_d.cpu(), buf_c, rtol=rel, atol=rel)
    vec_d, sc_d = torch.full_like(dev[0], float("nan")), torch.full((2,), float("nan"), dtype=dtype, device=device)
    gpu.unpack(buf_d, vec_d, sc_d, 2.0)
    torch.testing.assert_close(vec_d.cpu(), cpu[0], rtol=rel, atol=rel)
    torch.testing.assert_close(sc_d.cpu(), scalars_c, rtol=0, atol=0)
