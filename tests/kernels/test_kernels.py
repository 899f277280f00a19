"""Fused vector kernels: the CUDA sources compile, the torch twins compute the stated functions.

CPU (always): every ``kernels/*.cu`` compiles with nvcc for sm_80 and sm_90; the
torch twins equal float64 references of their formulas; a CG built from the
fused step and direction update reproduces :func:`hpcopt.numerics.krylov.cg.cg`.
Every kernel, in float32 and float64, at sizes that are no multiple of the block:
the twin against a float64 reference of its formula (always), and on a GPU
(skipped without one) the CUDA kernel against its twin and against the same
reference, on fresh random inputs, with the write-only outputs poisoned (NaN)
before the launch.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcopt.kernels import CpuKernels, Kernels, neumann_coefficient, select_backend
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


# -- every kernel: the twin, and on a GPU the CUDA kernel, against float64 references ---------
#
# One case per kernel: which inputs it overwrites or only writes (poisoned with NaN
# before the call, so an element left unwritten shows), how to call it, and its
# formula evaluated in float64 on the same (dtype-rounded) inputs and scalars.  The
# tolerances are those the GPU check reports against: sums within 1e-5 relative in
# float32 and 1e-12 in float64; vectors within 1e-6 (float32) and 1e-13 (float64) of
# the reference in norm, and elementwise to a few ulp.  The sizes are no multiple of
# the 256-thread block; 300 001 is also more than the 1024-block grid covers in one
# sweep, so the grid-stride loop wraps.

SIZES = (1, 257, 1000, 300_001)
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
SUM_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
NORM_TOL = {torch.float32: 1e-6, torch.float64: 1e-13}
ELEMENT_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
YS, SHS = 2.0, 1e4  # NLCG curvature sums of the update: keep h well away from 0 (z = r/h is then well conditioned)

Sums = tuple[float, ...]


def _scalar(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype``, as the kernels receive it (np.float32 / np.float64)."""
    return float(torch.tensor(value, dtype=dtype))


def _sums(value: object) -> Sums:
    """The sums a kernel method returned (``pack`` returns its buffer and ``unpack`` nothing: no sums)."""
    if isinstance(value, tuple):
        return tuple(float(v) for v in value)
    if isinstance(value, float):
        return (value,)
    return ()


def _inputs(n: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Tensors 0-7: random length-n vectors (3 positive: a diagonal h); 8: a random (n+2) buffer;
    9: two scalars; 10, 11: length-n and length-2 vectors for outputs."""
    generator = torch.Generator().manual_seed(seed)
    vectors = [torch.randn(n, generator=generator, dtype=torch.float64) for _ in range(8)]
    vectors[3] = vectors[3].abs() + 0.5
    buffer = torch.randn(n + 2, generator=generator, dtype=torch.float64)
    scalars = torch.tensor([1.5, -2.0], dtype=torch.float64)
    return [t.to(dtype) for t in (*vectors, buffer, scalars, torch.zeros(n, dtype=torch.float64), torch.zeros(2))]


@dataclass(frozen=True)
class KernelCase:
    """One kernel: ``call(kernels, tensors, dtype)`` runs it and returns its sums;
    ``reference(tensors64, dtype)`` gives ``({tensor index: expected}, sums)`` in float64."""

    name: str
    writes: tuple[int, ...]  # tensors the kernel changes (compared with the reference)
    poison: tuple[int, ...]  # tensors it only writes: NaN before the call
    call: Callable[[Kernels, list[torch.Tensor], torch.dtype], object]
    reference: Callable[[list[torch.Tensor], torch.dtype], tuple[dict[int, torch.Tensor], Sums]]


def _ref_cg_step(t: list[torch.Tensor], dtype: torch.dtype) -> tuple[dict[int, torch.Tensor], Sums]:
    alpha = _scalar(0.3, dtype)
    x, r = t[0] + alpha * t[2], t[1] - alpha * t[3]
    return {0: x, 1: r}, (float(r @ r),)


def _ref_cg_direction(t: list[torch.Tensor], dtype: torch.dtype) -> tuple[dict[int, torch.Tensor], Sums]:
    p = t[5] + _scalar(0.7, dtype) * t[4]
    return {4: p}, (float(p @ p), float(t[6] @ p))


def _ref_nlcg_dots(t: list[torch.Tensor], dtype: torch.dtype) -> tuple[dict[int, torch.Tensor], Sums]:
    s, y = t[0], t[1] - t[2]
    return {}, (float(y @ s), float((t[3] * s) @ s))


def _ref_nlcg_precondition(t: list[torch.Tensor], dtype: torch.dtype) -> tuple[dict[int, torch.Tensor], Sums]:
    h, z, g, g_prev, s = t[3], t[4], t[5], t[6], t[0]
    ys, shs, eps = _scalar(YS, dtype), _scalar(SHS, dtype), _scalar(1e-8, dtype)
    h_new = (h - (h * s) ** 2 / shs + (g - g_prev) ** 2 / ys).abs()
    r = -g
    z_new = r / (h_new + eps)
    return {3: h_new, 4: z_new}, (float(r @ z_new), float(r @ z))


def _ref_nlcg_step(t: list[torch.Tensor], dtype: torch.dtype) -> tuple[dict[int, torch.Tensor], Sums]:
    d = t[4] + _scalar(0.5, dtype) * t[2]
    s = _scalar(0.01, dtype) * d
    return {1: t[1] + s, 2: d, 7: s}, (float(s @ s),)


def _ref_sq_distance(t: list[torch.Tensor], dtype: torch.dtype) -> tuple[dict[int, torch.Tensor], Sums]:
    diff = t[0] - t[1]
    return {}, (float(diff @ diff),)


NEUMANN = (0.01, 0.1, 0.9, 0.99)  # coef, eta, mu, gamma


def _ref_neumann_update(t: list[torch.Tensor], dtype: torch.dtype) -> tuple[dict[int, torch.Tensor], Sums]:
    coef, eta, mu, gamma = (_scalar(v, dtype) for v in NEUMANN)
    w, v, m, g = t[0], t[1], t[2], t[5]
    d = g + coef * (w - v)
    m_new = mu * m - eta * d
    w_new = w + mu * m_new - eta * d
    step = w_new - w
    return {0: w_new, 1: w_new + gamma * (v - w_new), 2: m_new}, (float(step @ step),)


def _ref_tr_trial(t: list[torch.Tensor], dtype: torch.dtype) -> tuple[dict[int, torch.Tensor], Sums]:
    return {7: t[0] + t[1]}, (float(t[1] @ t[1]),)


def _ref_pack(t: list[torch.Tensor], dtype: torch.dtype) -> tuple[dict[int, torch.Tensor], Sums]:
    return {8: torch.cat([_scalar(0.5, dtype) * t[0], t[9]])}, ()


def _ref_unpack(t: list[torch.Tensor], dtype: torch.dtype) -> tuple[dict[int, torch.Tensor], Sums]:
    n = t[0].numel()
    return {10: _scalar(2.0, dtype) * t[8][:n], 11: t[8][n:]}, ()


KERNEL_CASES = [
    KernelCase("cg_step", (0, 1), (), lambda k, t, dt: k.cg_step_(t[0], t[1], t[2], t[3], 0.3), _ref_cg_step),
    KernelCase("cg_direction", (4,), (), lambda k, t, dt: k.cg_direction_(t[4], t[5], t[6], 0.7), _ref_cg_direction),
    KernelCase("nlcg_dots", (), (), lambda k, t, dt: k.nlcg_dots(t[0], t[1], t[2], t[3]), _ref_nlcg_dots),
    KernelCase(
        "nlcg_precondition",
        (3, 4),
        (),
        lambda k, t, dt: k.nlcg_precondition_(t[3], t[4], t[5], t[6], t[0], YS, SHS, update=True),
        _ref_nlcg_precondition,
    ),
    KernelCase(
        "nlcg_step", (1, 2, 7), (7,), lambda k, t, dt: k.nlcg_step_(t[1], t[2], t[7], t[4], 0.5, 0.01), _ref_nlcg_step
    ),
    KernelCase("sq_distance", (), (), lambda k, t, dt: k.sq_distance(t[0], t[1]), _ref_sq_distance),
    KernelCase(
        "neumann_update",
        (0, 1, 2),
        (),
        lambda k, t, dt: k.neumann_update_(t[0], t[1], t[2], t[5], *NEUMANN),
        _ref_neumann_update,
    ),
    KernelCase("tr_trial", (7,), (7,), lambda k, t, dt: k.tr_trial(t[7], t[0], t[1]), _ref_tr_trial),
    KernelCase("pack", (8,), (8,), lambda k, t, dt: k.pack(t[8], t[0], t[9], 0.5), _ref_pack),
    KernelCase("unpack", (10, 11), (10, 11), lambda k, t, dt: k.unpack(t[8], t[10], t[11], 2.0), _ref_unpack),
]


def test_the_cases_cover_every_kernel() -> None:
    twin_methods = {name.rstrip("_") for name in dir(CpuKernels) if not name.startswith("_") and name != "name"}
    assert {case.name for case in KERNEL_CASES} == twin_methods


def _run(kernels: Kernels, case: KernelCase, inputs: list[torch.Tensor], device: torch.device) -> tuple:
    """The case on fresh copies of ``inputs`` on ``device``: (the tensors afterwards, on the CPU; the sums)."""
    tensors = [t.clone().to(device) for t in inputs]
    for i in case.poison:
        tensors[i].fill_(float("nan"))
    sums = _sums(case.call(kernels, tensors, inputs[0].dtype))
    return [t.cpu() for t in tensors], sums


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def _compare(
    case: KernelCase,
    dtype: torch.dtype,
    got: list[torch.Tensor],
    got_sums: Sums,
    want: dict[int, torch.Tensor],
    want_sums: Sums,
    what: str,
) -> tuple[dict[str, float], list[str]]:
    """The largest deviations of ``got`` from ``want`` (relative), and what is out of tolerance."""
    deviations = {"vector": 0.0, "sum": 0.0}
    problems = []
    for i, expected in want.items():
        out = got[i].to(torch.float64)
        if not bool(torch.isfinite(out).all()):
            deviations["vector"] = float("inf")
            problems.append(f"{case.name} [{what}]: tensor {i} has unwritten (NaN) or non-finite elements")
            continue
        error = float((out - expected).norm()) / max(float(expected.norm()), 1e-300)
        deviations["vector"] = max(deviations["vector"], error)
        if error > NORM_TOL[dtype]:
            problems.append(f"{case.name} [{what}]: tensor {i} off by {error:.2e} in norm")
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        try:
            torch.testing.assert_close(
                out, expected, rtol=ELEMENT_TOL[dtype], atol=ELEMENT_TOL[dtype] * max(scale, 1.0)
            )
        except AssertionError as exc:
            problems.append(f"{case.name} [{what}] tensor {i}: {exc}")
    if len(got_sums) != len(want_sums):
        problems.append(f"{case.name} [{what}]: {len(got_sums)} sums, expected {len(want_sums)}")
    for a, b in zip(got_sums, want_sums):
        error = _relative(a, b)
        deviations["sum"] = max(deviations["sum"], error)
        if not error <= SUM_TOL[dtype]:
            problems.append(f"{case.name} [{what}]: sum {a!r} vs {b!r} ({error:.2e} relative)")
    return deviations, problems


@DTYPES
@pytest.mark.parametrize("n", SIZES[:-1])  # the grid-stride wrap is a GPU matter; 300 001 costs ~1 s per case on CPU
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda case: case.name)
def test_twin_matches_its_float64_reference(case: KernelCase, n: int, dtype: torch.dtype) -> None:
    inputs = _inputs(n, dtype, seed=1000 + n)
    got, got_sums = _run(twin, case, inputs, torch.device("cpu"))
    want, want_sums = case.reference([t.to(torch.float64) for t in inputs], dtype)
    _, problems = _compare(case, dtype, got, got_sums, want, want_sums, "twin vs float64")
    assert not problems, "\n".join(problems)


@needs_gpu
@DTYPES
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda case: case.name)
def test_cuda_kernel_matches_its_twin_and_float64_reference(
    case: KernelCase, n: int, dtype: torch.dtype, record_property: Callable[[str, object], None]
) -> None:
    """Fresh random inputs per size; the deviations are recorded for the GPU check's report."""
    from hpcopt.kernels.cuda import CudaKernels

    device = torch.device("cuda", torch.cuda.current_device())
    inputs = _inputs(n, dtype, seed=2000 + n)
    got, got_sums = _run(CudaKernels(device), case, inputs, device)
    expected, expected_sums = _run(twin, case, inputs, torch.device("cpu"))
    vs_twin, problems = _compare(
        case, dtype, got, got_sums, {i: expected[i].double() for i in case.writes}, expected_sums, "cuda vs twin"
    )
    want, want_sums = case.reference([t.to(torch.float64) for t in inputs], dtype)
    vs_reference, more = _compare(case, dtype, got, got_sums, want, want_sums, "cuda vs float64")
    # Recorded before the verdict, so that the report has the figures of a failing case too.
    for what, deviations in (("twin", vs_twin), ("float64", vs_reference)):
        for kind, value in deviations.items():
            record_property(f"{case.name}:{kind}_vs_{what}", value)
    assert not problems + more, "\n".join(problems + more)
