"""The Python half of ``benchmarks/gpu_check.sh``: install, environment, data, collectives, summary.

``gpu_check.sh`` runs each step of the GPU check with its own time limit; the steps
that are not a test or a benchmark script of their own are subcommands here:

* ``install``: hpcopt from the source tree and the carried wheels (``mpich``,
  ``pytest-mpi``; ``mpi4py`` and hpcopt's own wheel as fallbacks), with no network;
* ``env``: GPU, driver, torch, CuPy, MPI and what hpcopt makes of them;
* ``data``: the MNIST folder the training runs use (carried, or synthetic);
* ``collectives``: allreduce time of CPU and GPU tensors, staged through the host
  and, where MPI is CUDA-aware, direct (run under ``mpiexec``);
* ``summary``: every figure in one JSON file, the issue's goals, a table.

Only the standard library is imported at the top: ``install`` runs before hpcopt is
installed, and ``summary`` needs numpy and h5py only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Not copied into the build tree: environments, build output, caches, carried wheels, data, logs.
COPY_IGNORE = shutil.ignore_patterns(
    ".venv",
    ".git",
    "wheels",
    ".whl",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    "runs",
    "shared",
    "*.h5",
)

# The issue's goals, as thresholds.
SUM_GOAL = {"float32": 1e-5, "float64": 1e-12}
BANDWIDTH_GOAL = 0.80  # fused CG step / device-to-device copy, at the largest size
FUSED_GOAL = 1.5  # unfused torch time / fused kernel time, at the largest size
HVP_GOAL = 2.0  # fastest Hessian product / gradient
SPEEDUP_GOAL = 10.0  # CPU step time / GPU step time, cnn at batch 2000
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-6  # GPU vs CPU losses: float32 agreement (as tests/training/test_device.py)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def run(command: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
    """Run ``command``, echoing it; output captured as text."""
    print("$ " + " ".join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False, **options)
    for stream in (done.stdout, done.stderr):
        if stream.strip():
            print(stream.rstrip(), flush=True)
    return done


# -- install -----------------------------------------------------------------------------


def _wheel(wheels: Path, name: str) -> Path | None:
    found = sorted(wheels.glob(f"{name}-*.whl"))
    return found[-1] if found else None


def _venv_python(venv: Path, base_python: str) -> Path:
    """A venv at ``venv`` that also sees the site-packages of ``base_python`` (torch, CuPy, ...)."""
    import venv as venv_module

    venv_module.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(venv)
    python = venv / "bin" / "python"
    site_dirs = json.loads(
        subprocess.run(
            [base_python, "-c", "import json, sys; print(json.dumps(sys.path))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    site_dirs = [
        p for p in site_dirs if p.rstrip("/").endswith(("site-packages", "dist-packages")) and Path(p).is_dir()
    ]
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # addsitedir (not a bare path line) so that the .pth files there are processed too.
    lines = [f"import site; site.addsitedir({p!r})" for p in site_dirs]
    (Path(purelib) / "_gpu_check_base_site.pth").write_text("\n".join(lines) + "\n")
    return python


def _scripts(python: Path) -> Path:
    """The folder where pip puts the console scripts of ``python``'s environment (mpiexec among them)."""
    command = [str(python), "-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]
    return Path(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip())


def _mpi_works(python: Path) -> bool:
    mpiexec = _scripts(python) / "mpiexec"
    if not mpiexec.exists():
        print(f"no {mpiexec}")
        return False
    probe = "from mpi4py import MPI; assert MPI.COMM_WORLD.Get_size() == 2, MPI.COMM_WORLD.Get_size()"
    try:
        done = run([str(mpiexec), "-n", "2", str(python), "-c", probe], timeout=60)
    except subprocess.TimeoutExpired:
        print("mpiexec -n 2 timed out")
        return False
    return done.returncode == 0


def command_install(args: argparse.Namespace) -> int:
    """Install the carried wheels and hpcopt (from a copy of the tree) without network."""
    wheels: Path = args.wheels
    report: dict[str, Any] = {"wheels": {}, "target": args.target}
    if wheels.is_dir():
        report["wheels"] = {p.name: p.stat().st_size for p in sorted(wheels.glob("*.whl"))}
    carried = [w for w in (_wheel(wheels, "mpich"), _wheel(wheels, "pytest_mpi")) if w is not None]
    missing = [name for name in ("mpich", "pytest_mpi") if _wheel(wheels, name) is None]
    if missing:
        print(f"warning: no {', '.join(missing)} wheel in {wheels} (benchmarks/gpu_wheels.sh makes them)")
    report["missing_wheels"] = missing

    python = Path(args.python)
    if args.target == "venv":
        python = _venv_python(args.venv, args.python)
    report["python"] = str(python)
    source = args.work / "src"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(REPO, source, ignore=COPY_IGNORE)
    pip = [str(python), "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile"]
    pip += ["--disable-pip-version-check", "--no-build-isolation", "--ignore-installed"]
    done = run([*pip, *map(str, carried), str(source)], cwd=args.work)
    if done.returncode != 0 and args.target == "image":
        print("installing into the interpreter's environment failed: a venv beside it instead")
        python = _venv_python(args.venv, args.python)
        report.update(target="venv", python=str(python))
        pip[0] = str(python)
        done = run([*pip, *map(str, carried), str(source)], cwd=args.work)
    report["hpcopt_from"] = "tree"
    own = _wheel(wheels, "hpcopt")
    if done.returncode != 0 and own is not None:
        print(f"building hpcopt from the tree failed: the carried {own.name} instead (it may be older than the tree)")
        done = run([*pip, *map(str, carried), str(own)], cwd=args.work)
        report["hpcopt_from"] = own.name
    if done.returncode != 0:
        write_json(args.json, report)
        return 1
    report["mpi4py_from"] = "environment"
    if not _mpi_works(python):
        fallback = _wheel(wheels, "mpi4py")
        if fallback is None:
            print("mpiexec -n 2 does not give a world of 2 and no mpi4py wheel is carried")
            write_json(args.json, report)
            return 1
        print(f"mpi4py does not pair with the carried MPICH: installing {fallback.name}")
        run([*pip, str(fallback)], cwd=args.work)
        report["mpi4py_from"] = fallback.name
        if not _mpi_works(python):
            write_json(args.json, report)
            return 1
    write_json(args.json, report)
    # The last line is the interpreter the rest of the check uses.
    print(python)
    return 0


# -- environment ---------------------------------------------------------------------------


def _guard(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # a report: every failure is a finding, not a crash
        return f"error: {type(exc).__name__}: {exc}"


def _nvidia_smi() -> Any:
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"
    fields = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu"
    done = subprocess.run(
        ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True, check=False
    )
    rows = [line.split(", ") for line in done.stdout.strip().splitlines()]
    return [dict(zip(fields.split(","), row)) for row in rows] or done.stderr.strip()


def _torch() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "version": str(torch.__version__),
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "NVIDIA_TF32_OVERRIDE": os.environ.get("NVIDIA_TF32_OVERRIDE", "unset"),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device_count=torch.cuda.device_count(),
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_GiB=round(props.total_memory / 2**30, 1),
        )
    return info


def _cupy() -> dict[str, Any]:
    import cupy

    info: dict[str, Any] = {"version": cupy.__version__}
    info["runtime"] = _guard(cupy.cuda.runtime.runtimeGetVersion)
    info["driver"] = _guard(cupy.cuda.runtime.driverGetVersion)
    info["devices"] = _guard(cupy.cuda.runtime.getDeviceCount)
    info["nvrtc"] = _guard(lambda: cupy.cuda.nvrtc.getVersion())
    return info


def _mpi() -> dict[str, Any]:
    import mpi4py
    from mpi4py import MPI

    from hpcopt.comm import cuda_aware_mpi
    from hpcopt.comm.cuda_aware import _libmpi_query_cuda_support

    query = getattr(MPI, "Query_cuda_support", None)
    return {
        "mpi4py": mpi4py.__version__,
        "library": MPI.Get_library_version().strip().splitlines()[0],
        "standard": "{}.{}".format(*MPI.Get_version()),
        "mpi4py_query_cuda_support": _guard(query) if query is not None else "not in this mpi4py",
        "libmpi_MPIX_Query_cuda_support": _guard(_libmpi_query_cuda_support),
        # What hpcopt decides with the library's answer alone, and with this environment.
        "cuda_aware_library": _guard(lambda: cuda_aware_mpi({})),
        "cuda_aware_effective": _guard(cuda_aware_mpi),
        "HPCOPT_CUDA_AWARE": os.environ.get("HPCOPT_CUDA_AWARE", "unset"),
        "mpiexec": shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or "not beside the interpreter",
    }


def _hpcopt() -> dict[str, Any]:
    import torch

    import hpcopt
    from hpcopt.kernels import fused_backend
    from hpcopt.kernels.cuda import kernel_dir

    info: dict[str, Any] = {"version": hpcopt.__version__, "imported_from": str(Path(hpcopt.__file__).parent)}
    info["kernel_dir"] = _guard(lambda: str(kernel_dir()))
    if torch.cuda.is_available():
        info["fused_backend_cuda"] = _guard(lambda: type(fused_backend("cuda")).__name__)
    return info


def _versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def command_env(args: argparse.Namespace) -> int:
    nvcc = shutil.which("nvcc")
    nvcc_version = "not found"
    if nvcc is not None:
        nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
        nvcc_version = nvcc_version.strip().splitlines()[-1] if nvcc_version.strip() else "?"
    report = {
        "host": {
            "node": platform.node(),
            "machine": platform.machine(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "executable": sys.executable,
        },
        "nvidia_smi": _guard(_nvidia_smi),
        "nvcc": nvcc_version,
        "torch": _guard(_torch),
        "cupy": _guard(_cupy),
        "mpi": _guard(_mpi),
        "hpcopt": _guard(_hpcopt),
        "packages": _versions("numpy", "scipy", "h5py", "mpi4py", "mpich", "pytest", "pytest-mpi", "pytest-timeout"),
    }
    print(json.dumps(report, indent=1, default=str))
    write_json(args.json, report)
    return 0


# -- data ------------------------------------------------------------------------------------


def command_data(args: argparse.Namespace) -> int:
    """Print the folder holding MNIST for the runs: the first found, else synthetic IDX files."""
    import numpy as np

    from hpcopt.errors import DataError
    from hpcopt.problems.mnist.idx import write_idx
    from hpcopt.problems.mnist.problem import find_mnist_dir

    candidates = [os.environ.get("HPCOPT_DATA_DIR", ""), str(REPO / "wheels"), str(REPO.parent / "shared" / "datasets")]
    report: dict[str, Any] = {"candidates": [c for c in candidates if c]}
    for candidate in report["candidates"]:
        try:
            folder = find_mnist_dir(candidate)
        except DataError:
            continue
        report.update(source="MNIST", folder=str(folder))
        break
    else:
        # Random digits: the timings and the GPU-vs-CPU agreement do not depend on what the pixels show.
        folder = args.work / "mnist"
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10_000, 28, 28), dtype=np.uint8))
        write_idx(folder / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 10_000, dtype=np.uint8))
        report.update(source="synthetic (random images and labels: MNIST not found)", folder=str(folder))
    write_json(args.json, report)
    print(report["folder"])
    return 0


# -- collectives -----------------------------------------------------------------------------


def command_collectives(args: argparse.Namespace) -> int:
    """Median allreduce time per size and path, slowest rank; rank 0 writes the JSON."""
    import torch

    from hpcopt.comm import Communicator, cuda_aware_mpi
    from hpcopt.comm.calibration import parse_sizes

    comm = Communicator()
    sizes = parse_sizes(args.sizes)
    paths: list[tuple[str, torch.device, bool | None]] = [("cpu", torch.device("cpu"), None)]
    if args.device == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        paths.append(("cuda-staged", device, False))
        if cuda_aware_mpi({}):
            paths.append(("cuda-direct", device, True))
    else:
        paths.append(("cpu-staged", torch.device("cpu"), None))  # the staging path on host tensors
    rows = []
    for name, device, aware in paths:
        if aware is not None:
            comm._cuda_aware = aware  # which path device buffers take (the benchmark's choice, not the library's)
        comm.force_staging = name == "cpu-staged"
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for count in sizes:
            buffer = torch.empty(count, dtype=torch.float32, device=device)
            times = []
            repeats = args.repeats if count <= 1_000_000 else max(3, args.repeats // 4)
            correct = True
            for i in range(repeats + 3):
                buffer.fill_(comm.rank + 1.0)
                sync()
                comm.barrier()
                start = time.perf_counter()
                comm.allreduce_(buffer, reuse=False)
                sync()
                if i >= 3:
                    times.append(time.perf_counter() - start)
                correct = correct and bool((buffer == comm.size * (comm.size + 1) / 2).all())
            median = comm.allreduce_scalars([statistics.median(times)], "max")[0]
            agree = comm.allreduce_scalars([0.0 if correct else 1.0], "max")[0] == 0.0
            rows.append({"path": name, "floats": count, "bytes": 4 * count, "seconds": median, "correct": agree})
            if comm.is_root:
                print(
                    f"{name:<12} {count:>10} floats {median * 1e6:>12.1f} us {'ok' if agree else 'WRONG'}", flush=True
                )
    comm.force_staging = False
    if comm.is_root:
        write_json(args.json, {"ranks": comm.size, "rows": rows})
    return 0 if all(row["correct"] for row in rows) else 1


# -- summary ---------------------------------------------------------------------------------


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _steps(work: Path) -> list[dict[str, Any]]:
    rows = []
    path = work / "steps.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            name, status, rc, seconds, note = (line.split("\t") + [""] * 5)[:5]
            rows.append({"name": name, "status": status, "rc": rc, "seconds": float(seconds or 0), "note": note})
    return rows


def _junit(path: Path) -> dict[str, Any] | None:
    """Counts, failures and recorded properties of one pytest ``--junitxml`` file."""
    if not path.exists():
        return None
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        return {"error": f"unreadable: {exc}"}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    properties: list[dict[str, Any]] = []
    for case in root.iter("testcase"):
        counts["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for kind, key in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
            element = case.find(kind)
            if element is not None:
                counts[key] += 1
                if kind != "skipped":
                    failed.append(f"{name}: {(element.get('message') or '').splitlines()[0][:200]}")
        values = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        if values:
            properties.append({"test": case.get("name", ""), **values})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed, "properties": properties}


KERNEL_TEST = re.compile(r"test_cuda_kernel_matches_its_twin_and_float64_reference\[(\w+)-(\d+)-(float\d+)\]")


def _kernel_deviations(properties: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per kernel, size and dtype: the deviations its GPU test recorded (relative)."""
    rows = []
    for entry in properties:
        match = KERNEL_TEST.match(entry["test"])
        if match is not None:
            values = {key.split(":", 1)[1]: float(value) for key, value in entry.items() if ":" in key}
            rows.append({"kernel": match.group(1), "n": int(match.group(2)), "dtype": match.group(3), **values})
    return rows


def _kernel_agreement(deviations: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Largest deviation per dtype and comparison, with the kernel and size it came from."""
    worst: dict[str, dict[str, Any]] = {}
    for row in deviations:
        for key, value in row.items():
            if key in ("kernel", "n", "dtype"):
                continue
            what = f"{row['dtype']} {key}"
            if what not in worst or value > worst[what]["max"]:
                worst[what] = {"max": value, "kernel": row["kernel"], "n": row["n"]}
    return worst


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a JSON value (numpy scalars unwrapped, bytes decoded)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, (bool, int, float, str)) else str(value)


RUN_NAME = re.compile(r"^(?P<model>[\w-]+?)_(?P<optimizer>[\w-]+)_(?P<device>cpu|cuda-staged|cuda-direct)$")


def _runs(folder: Path) -> dict[str, dict[str, Any]]:
    """What each run log says: losses, per-step times (the first step includes warm-up), attributes."""
    import h5py
    import numpy as np

    runs: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.h5")):
        match = RUN_NAME.match(path.stem)
        if match is None:
            continue
        try:
            with h5py.File(path, "r", swmr=True) as log:
                wall = np.asarray(log["iterations/wall_time"][:], dtype=float)
                loss = np.asarray(log["iterations/loss"][:], dtype=float)
                comm_time = np.asarray(log["iterations/comm_time"][:], dtype=float)
                attrs = {k: log.attrs[k] for k in ("status", "device", "gpu_model", "kernels", "cuda_aware_mpi")}
                attrs.update(world_size=int(log.attrs["world_size"]), num_parameters=int(log.attrs["num_parameters"]))
                attrs.update(batch_size=int(log.attrs["batch_size"]))
        except (OSError, KeyError) as exc:
            runs[path.stem] = {**match.groupdict(), "error": str(exc)}
            continue
        step_s = np.diff(np.concatenate([[0.0], wall]))
        steady = step_s[1:] if len(step_s) > 1 else step_s
        runs[path.stem] = {
            **match.groupdict(),
            "steps": len(loss),
            "comm_s": comm_time.tolist(),
            "loss": loss.tolist(),
            "step_s": step_s.tolist(),
            "steady_step_s": float(np.median(steady)) if len(steady) else None,
            "steady_comm_s": float(np.median(comm_time[1:] if len(comm_time) > 1 else comm_time))
            if len(comm_time)
            else None,
            "attributes": {k: _plain(v) for k, v in attrs.items()},
        }
    return runs


def _pairs(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each GPU run against the CPU run of the same model and optimizer: speed-up and loss agreement."""
    import numpy as np

    pairs = []
    for name, gpu in runs.items():
        if gpu["device"] == "cpu" or "error" in gpu:
            continue
        cpu = runs.get(f"{gpu['model']}_{gpu['optimizer']}_cpu")
        if cpu is None or "error" in cpu:
            continue
        k = min(cpu["steps"], gpu["steps"])
        a, b = np.asarray(gpu["loss"][:k]), np.asarray(cpu["loss"][:k])
        difference = np.abs(a - b)
        # Steady steps only, and the same ones on both devices.
        cpu_steps, gpu_steps = cpu["step_s"][1:k] or cpu["step_s"][:k], gpu["step_s"][1:k] or gpu["step_s"][:k]
        gpu_comm = gpu["comm_s"][1:k] or gpu["comm_s"][:k]
        speedup = sum(cpu_steps) / sum(gpu_steps) if sum(gpu_steps) > 0 else None
        pairs.append(
            {
                "model": gpu["model"],
                "optimizer": gpu["optimizer"],
                "gpu_run": name,
                "steps_compared": k,
                "cpu_step_s": float(np.mean(cpu_steps)) if cpu_steps else None,
                "gpu_step_s": float(np.mean(gpu_steps)) if gpu_steps else None,
                "speedup": speedup,
                "gpu_comm_s": float(np.mean(gpu_comm)) if gpu_comm else None,
                "loss_first_rel_diff": float(difference[0] / abs(b[0])) if k else None,
                "loss_max_rel_diff": float(np.max(difference / np.abs(b))) if k else None,
                "losses_agree": bool(np.all(difference <= LOSS_ATOL + LOSS_RTOL * np.abs(b))) if k else False,
            }
        )
    return pairs


def _goal(goal: str, measured: str, target: str, met: bool | None, note: str = "") -> dict[str, Any]:
    status = "not measured" if met is None else ("met" if met else "MISSED")
    return {"goal": goal, "measured": measured, "target": target, "status": status, "note": note}


def _goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    goals = []
    # 1. every kernel agrees with its twin.
    tests = report["tests"].get("gpu") or {}
    agreement = report["tests"].get("kernel_agreement") or {}
    kernel_failures = [f for f in tests.get("failed", []) if "test_cuda_kernel_matches" in f]
    for dtype in ("float32", "float64"):
        worst = agreement.get(f"{dtype} sum_vs_twin")
        if worst is None:
            goals.append(_goal(f"kernels == twins, {dtype} sums", "-", f"<= {SUM_GOAL[dtype]:.0e}", None))
            continue
        met = worst["max"] <= SUM_GOAL[dtype] and not kernel_failures
        vector = agreement.get(f"{dtype} vector_vs_twin", {}).get("max", float("nan"))
        goals.append(
            _goal(
                f"kernels == twins, {dtype} sums",
                f"{worst['max']:.1e} ({worst['kernel']}, n={worst['n']}); vectors {vector:.1e}",
                f"<= {SUM_GOAL[dtype]:.0e}",
                met,
                f"{len(kernel_failures)} kernel test(s) failed" if kernel_failures else "",
            )
        )
    # 2. fused CG step bandwidth.
    rows = ((report["kernels"].get("float32") or {}).get("devices") or {}).get("cuda", {}).get("rows") or []
    if rows:
        top = max(rows, key=lambda row: row["floats"])
        fraction, ratio = top["fused_over_copy_bandwidth"], top["unfused_over_fused_time"]
        where = f"n={top['floats']:.0e}, float32"
        goals.append(
            _goal(
                "fused CG step / copy bandwidth",
                f"{fraction:.2f} ({top['fused_GBps']:.0f} / {top['copy_GBps']:.0f} GB/s, {where})",
                f">= {BANDWIDTH_GOAL:.2f}",
                fraction >= BANDWIDTH_GOAL,
                "fused/copy by size: "
                + ", ".join(f"{r['floats']:.0e} {r['fused_over_copy_bandwidth']:.2f}" for r in rows)
                + " (each step reads its sum back to the host: launch and sync overhead show at small sizes)",
            )
        )
        goals.append(
            _goal("fused CG step vs unfused torch", f"{ratio:.2f}x ({where})", f">= {FUSED_GOAL}x", ratio >= FUSED_GOAL)
        )
    else:
        goals.append(_goal("fused CG step / copy bandwidth", "-", f">= {BANDWIDTH_GOAL:.2f}", None))
        goals.append(_goal("fused CG step vs unfused torch", "-", f">= {FUSED_GOAL}x", None))
    # 3. HVP over gradient, fastest Hessian variant, per model and batch (the worst of them is the figure).
    hvp = report["hvp"] or {}
    if str(hvp.get("device", "")).startswith("cuda") and hvp.get("results"):
        ratios = []
        for result in hvp["results"]:
            hessians = {k: v for k, v in result["variants"].items() if k != "ggn"}
            best = min(hessians, key=lambda k: hessians[k]["product_over_gradient"])
            ratios.append((hessians[best]["product_over_gradient"], result["model"], result["batch"], best))
        worst_ratio = max(ratios)
        detail = ", ".join(f"{m} b{b} {r:.2f}" for r, m, b, _ in ratios)
        goals.append(
            _goal(
                "HVP / gradient (fastest variant)",
                f"worst {worst_ratio[0]:.2f} ({worst_ratio[1]}, batch {worst_ratio[2]}, {worst_ratio[3]})",
                f"<= {HVP_GOAL}",
                worst_ratio[0] <= HVP_GOAL,
                detail,
            )
        )
    else:
        goals.append(_goal("HVP / gradient (fastest variant)", "-", f"<= {HVP_GOAL}", None))
    # 4. step time GPU vs CPU, cnn at batch 2000; 5. losses agree (the dropout-free model).
    pairs = report["training"].get("pairs") or []
    for optimizer in ("apts-d", "hf"):
        found = [p for p in pairs if p["model"] == "cnn" and p["optimizer"] == optimizer and p["speedup"]]
        if not found:
            goals.append(_goal(f"{optimizer} step, GPU vs 1 CPU core per rank", "-", f">= {SPEEDUP_GOAL:.0f}x", None))
        for pair in found:
            goals.append(
                _goal(
                    f"{optimizer} step, GPU vs 1 CPU core per rank ({pair['gpu_run'].split('_')[-1]})",
                    f"{pair['speedup']:.1f}x ({pair['gpu_step_s']:.3f} s vs {pair['cpu_step_s']:.2f} s)",
                    f">= {SPEEDUP_GOAL:.0f}x",
                    pair["speedup"] >= SPEEDUP_GOAL,
                    f"GPU run: {pair['gpu_comm_s'] or 0:.3f} s/step in collectives "
                    f"({100 * (pair['gpu_comm_s'] or 0) / pair['gpu_step_s']:.0f} %; host staging copies not counted)",
                )
            )
    for pair in pairs:
        if pair["model"] != "cnn-small":
            continue
        goals.append(
            _goal(
                f"{pair['optimizer']} losses GPU == CPU ({pair['gpu_run'].split('_')[-1]}, cnn-small, TF32 off)",
                f"max rel {pair['loss_max_rel_diff']:.1e} over {pair['steps_compared']} steps "
                f"(first {pair['loss_first_rel_diff']:.1e})",
                f"rtol {LOSS_RTOL:.0e}",
                pair["losses_agree"],
            )
        )
    return goals


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _print_summary(report: dict[str, Any]) -> None:
    print(f"\n===== GPU check summary ({report['mode']}; {report['duration_s']:.0f} s) =====")
    if report["mode"] != "gpu":
        print(f"{report['reason']}: no GPU figure measured; the goals below read 'not measured'")
    steps = [[s["name"], s["status"], s["rc"], f"{s['seconds']:.1f}", s["note"]] for s in report["steps"]]
    print(_table(steps, ["step", "status", "rc", "seconds", "note"]))
    for name, result in report["tests"].items():
        if name in ("kernel_agreement", "kernel_deviations") or not result:
            continue
        print(
            f"tests {name}: {result.get('passed', 0)} passed, {result.get('failures', 0)} failed, "
            f"{result.get('errors', 0)} errors, {result.get('skipped', 0)} skipped"
        )
        for failure in result.get("failed", [])[:10]:
            print(f"  FAILED {failure}")
    for dtype, data in sorted(report["kernels"].items()):
        for device, block in ((data or {}).get("devices") or {}).items():
            rows = [
                [
                    f"{r['floats']:.0e}",
                    f"{r['unfused_GBps']:.1f}",
                    f"{r['fused_GBps']:.1f}",
                    f"{r['copy_GBps']:.1f}",
                    f"{r['fused_over_copy_bandwidth']:.2f}",
                    f"{r['unfused_over_fused_time']:.2f}",
                ]
                for r in block["rows"]
            ]
            print(f"\nCG step bandwidth, {device} ({block['backend']}), {dtype}")
            print(_table(rows, ["floats", "unfused GB/s", "fused GB/s", "copy GB/s", "fused/copy", "unfused/fused t"]))
    hvp = report["hvp"] or {}
    if hvp.get("results"):
        rows = []
        for result in hvp["results"]:
            for variant, v in result["variants"].items():
                rows.append(
                    [
                        result["model"],
                        str(result["batch"]),
                        variant,
                        f"{result['gradient_s'] * 1e3:.2f}",
                        f"{v['product_s'] * 1e3:.2f}",
                        f"{v['product_over_gradient']:.2f}",
                    ]
                )
        print(f"\nCurvature products on {hvp.get('where', '?')}")
        print(_table(rows, ["model", "batch", "variant", "grad ms", "product ms", "product/grad"]))
    collectives = report["collectives"] or {}
    if collectives.get("rows"):
        rows = [
            [r["path"], f"{r['floats']:.0f}", f"{r['seconds'] * 1e6:.1f}", "ok" if r["correct"] else "WRONG"]
            for r in collectives["rows"]
        ]
        print(f"\nAllreduce, {collectives.get('ranks')} ranks (median, slowest rank)")
        print(_table(rows, ["path", "floats", "us", "result"]))
    runs = report["training"].get("runs") or {}
    if runs:
        rows = []
        for name, run_ in runs.items():
            if "error" in run_:
                rows.append([name, "error", "", "", "", run_["error"][:60]])
                continue
            losses = " ".join(f"{x:.5f}" for x in run_["loss"])
            first = run_["step_s"][0] if run_["step_s"] else float("nan")
            steady = run_["steady_step_s"] if run_["steady_step_s"] is not None else float("nan")
            comm = run_["steady_comm_s"] if run_["steady_comm_s"] is not None else float("nan")
            rows.append([name, str(run_["steps"]), f"{first:.3f}", f"{steady:.3f}", f"{comm:.4f}", losses])
        print("\nTraining runs, 2 ranks (step 1 includes warm-up; steady = median of the later steps)")
        print(_table(rows, ["run", "steps", "step 1 s", "steady s", "comm s", "losses"]))
    print("\nGoals")
    goals = [[g["goal"], g["measured"], g["target"], g["status"]] for g in report["goals"]]
    print(_table(goals, ["goal", "measured", "target", "status"]))
    for g in report["goals"]:
        if g["note"] and g["status"] != "not measured":
            print(f"  {g['goal']}: {g['note']}")


def command_summary(args: argparse.Namespace) -> int:
    work: Path = args.work
    report: dict[str, Any] = {
        "mode": args.mode,
        "reason": args.reason,
        "started_utc": args.started,
        "duration_s": time.time() - args.t0 if args.t0 else 0.0,
        "steps": _steps(work),
        "environment": _load(work / "json" / "env.json"),
        "install": _load(work / "json" / "install.json"),
        "data": _load(work / "json" / "data.json"),
        "tests": {},
        "kernels": {},
        "hvp": _load(work / "json" / "hvp.json"),
        "collectives": _load(work / "json" / "collectives.json"),
        "training": {},
    }
    gpu_tests = _junit(work / "junit_tests.xml")
    report["tests"]["gpu"] = gpu_tests
    report["tests"]["mpi"] = [_junit(p) for p in sorted(work.glob("junit_mpi.*.xml"))] or None
    if report["tests"]["mpi"]:
        merged: dict[str, Any] = {"failed": []}
        for part in report["tests"]["mpi"]:
            for key in ("tests", "passed", "failures", "errors", "skipped"):
                merged[key] = merged.get(key, 0) + (part or {}).get(key, 0)
            merged["failed"] += (part or {}).get("failed", [])
        report["tests"]["mpi"] = merged
    deviations = _kernel_deviations((gpu_tests or {}).get("properties", []))
    report["tests"]["kernel_agreement"] = _kernel_agreement(deviations)
    report["tests"]["kernel_deviations"] = deviations
    if gpu_tests:
        gpu_tests.pop("properties", None)
    for dtype in ("float32", "float64"):
        report["kernels"][dtype] = _load(work / "json" / f"kernels_{dtype}.json")
    runs = _runs(work / "runs") if (work / "runs").is_dir() else {}
    report["training"] = {
        "settings": _load(work / "json" / "training.json"),
        "runs": runs,
        "pairs": _pairs(runs),
    }
    report["goals"] = _goals(report)
    write_json(args.out, report)
    if not args.quiet:
        _print_summary(report)
    return 0


# -- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="install the carried wheels and hpcopt, no network")
    p.add_argument("--python", default=sys.executable, help="the interpreter whose torch/CuPy are used")
    p.add_argument("--target", choices=("image", "venv"), default="image", help="into that interpreter, or a venv")
    p.add_argument("--wheels", type=Path, default=REPO / "wheels")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--venv", type=Path)
    p.add_argument("--json", type=Path, required=True)
    p = sub.add_parser("env", help="print and record the environment")
    p.add_argument("--json", type=Path, required=True)
    p = sub.add_parser("data", help="print the MNIST folder for the runs (synthetic if none is found)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p = sub.add_parser("collectives", help="allreduce times, staged and direct (under mpiexec)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sizes", default="1e3,1e5,390859,1e7")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", type=Path, required=True)
    p = sub.add_parser("summary", help="merge the figures into one JSON file and print the tables")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", default="gpu")
    p.add_argument("--reason", default="")
    p.add_argument("--started", default="")
    p.add_argument("--t0", type=float, default=0.0)
    p.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "install" and args.venv is None:
        args.venv = args.work / "venv"
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "install": command_install,
        "env": command_env,
        "data": command_data,
        "collectives": command_collectives,
        "summary": command_summary,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
