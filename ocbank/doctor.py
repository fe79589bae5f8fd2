"""``ocbank doctor``: what will run on this machine, in one block for bug reports and benchmark results.

:func:`collect` gathers the versions (ocbank, Python, numpy, torch, faiss, onnxruntime,
Ray), each BLAS loaded in the process with its version, kernel and threads (threadpoolctl),
the CPU's vector extensions, torch's threads, CUDA and the GPU when present, and, unless
``measure=False``, numpy's and torch's GEMM rates beside the exact search rates of the three
CPU searches (faiss, torch, numpy) and the one ``cpu_search: auto`` uses. Optional parts
(onnxruntime, Ray, CUDA, the faiss GPU build) are named as absent, never an error.
:func:`render` turns it into text.

This module sits above every layer (it asks each for its facts); the CLI only calls it.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
import time
from typing import Any

import numpy as np

from . import __version__

# Optional packages whose absence is reported, not raised: import name -> what needs it.
OPTIONAL = {"onnxruntime": "ocbank export / serve --runtime onnxruntime", "ray": "build --backend ray, ocbank serve"}
# CPU flags worth naming (Linux /proc/cpuinfo names; arm64 lists its own, e.g. asimd, sve).
VECTOR_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "neon", "asimd", "sve", "sve2",
)
# Environment variables that change which BLAS kernel or how many threads run.
BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_ENABLE_INSTRUCTIONS")
# The short GEMM of the report: one 224^2 image's patches against 4096 centroids.
GEMM_SHAPE = (784, 4096, 1536)


def _module_version(name: str) -> tuple[str | None, str | None]:
    """(version, None) of an importable module, or (None, why it cannot be used)."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None, "not installed"
    except Exception as exc:  # noqa: BLE001  (a broken install is reported, not raised)
        return None, f"fails to import: {type(exc).__name__}: {exc}"
    return str(getattr(module, "__version__", "unknown")), None


def versions() -> dict[str, Any]:
    """{"ocbank", "python", "numpy", "torch", "faiss", "onnxruntime", "ray": version or None, "absent": {name: why}}."""
    import torch  # noqa: PLC0415

    from .engine._faiss import faiss  # noqa: PLC0415

    out: dict[str, Any] = {
        "ocbank": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "faiss": faiss.__version__,
    }
    absent: dict[str, str] = {}
    for name, needed_by in OPTIONAL.items():
        out[name], why = _module_version(name)
        if why is not None:
            absent[name] = f"{why} (needed by {needed_by})"
    out["absent"] = absent
    return out


def blas_libraries() -> list[dict[str, Any]]:
    """Each BLAS loaded in this process (numpy's, faiss's, ...): library, version, kernel architecture, threads."""
    import threadpoolctl  # noqa: PLC0415

    from .engine._faiss import faiss  # noqa: F401, PLC0415  (load faiss's BLAS so that it is listed)

    return [
        {
            "library": os.path.basename(info.get("filepath", "")),
            # The folder that holds it (e.g. faiss_cpu.libs) says which package bundled it, without this machine's paths.
            "bundled_in": os.path.basename(os.path.dirname(info.get("filepath", ""))),
            "internal_api": info.get("internal_api"),
            "version": info.get("version"),
            "architecture": info.get("architecture"),
            "threads": info.get("num_threads"),
            "threading_layer": info.get("threading_layer"),
        }
        for info in threadpoolctl.threadpool_info()
        if info.get("user_api") == "blas"
    ]


def cpu() -> dict[str, Any]:
    """The CPU's model, vendor, logical CPUs and vector extensions (empty where the OS lists no flags)."""
    from .engine.cpu_search import cpu_info  # noqa: PLC0415

    info = cpu_info()
    flags = set(info["flags"])
    return {
        "model": info["model"],
        "vendor": info["vendor"],
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "vector_extensions": [f for f in VECTOR_FLAGS if f in flags],
        "flags_listed": bool(flags),
    }


def torch_info() -> dict[str, Any]:
    """torch's threads, its BLAS (from its build config) and the CPU kernels it dispatches to."""
    import torch  # noqa: PLC0415

    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
    return {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "mkl": bool(torch.backends.mkl.is_available()),
        "cpu_capability": capability,
    }


def cuda() -> dict[str, Any]:
    """CUDA as torch sees it, the GPUs, and whether faiss has its GPU build."""
    import torch  # noqa: PLC0415

    from .engine._faiss import faiss, faiss_has_gpu  # noqa: PLC0415
    from .engine.device import cuda_available  # noqa: PLC0415

    build = hasattr(faiss, "StandardGpuResources")
    if not cuda_available():
        return {"available": False, "torch_cuda": torch.version.cuda, "devices": [], "faiss_gpu_build": build,
                "faiss_gpu": False, "note": "torch sees no CUDA GPU: banks and the backbone run on the CPU"}
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    has_gpu = faiss_has_gpu()
    return {"available": True, "torch_cuda": torch.version.cuda, "devices": devices, "faiss_gpu_build": build,
            "faiss_gpu": has_gpu,
            "note": None if has_gpu else "faiss has no usable GPU build: CUDA banks search with torch (gpu_search: auto)"}


def gemm_gflops(shape: tuple[int, int, int] | None = None, rounds: int = 3) -> dict[str, float]:
    """fp32 GFLOP/s of numpy's and torch's GEMM on this CPU ([n, dim] @ [dim, K], best of ``rounds``; GEMM_SHAPE)."""
    import torch  # noqa: PLC0415

    n, big_k, dim = GEMM_SHAPE if shape is None else shape
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, dim), dtype=np.float32)
    b = rng.standard_normal((big_k, dim), dtype=np.float32)
    a_t, b_t = torch.from_numpy(a), torch.from_numpy(b)
    runs = {"numpy": lambda: a @ b.T, "torch": lambda: a_t @ b_t.T}
    best = dict.fromkeys(runs, float("inf"))
    for round_ in range(rounds + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: 2.0 * n * big_k * dim / seconds / 1e9 for name, seconds in best.items()}


def search() -> dict[str, Any]:
    """The GEMM rates, the exact k=1 search rates of faiss, torch and numpy, and the search ``cpu_search: auto`` uses."""
    from .engine import cpu_search  # noqa: PLC0415

    gemm = gemm_gflops()
    measured = cpu_search.measure()
    auto = cpu_search.auto_cpu_search()
    rule = "the rule (faiss's BLAS runs a generic kernel) left faiss out"
    why = {"env": f"${cpu_search.CHOICE_ENV}", "rule": f"{rule}, then measured torch and numpy now, cached",
           "cache": f"cached measurement; {rule}" if auto.get("generic_blas") else "cached measurement",
           "measured": "measured now, cached"}[auto["source"]]
    return {
        "numpy_gemm_gflops": gemm["numpy"],
        "torch_gemm_gflops": gemm["torch"],
        "faiss_knn_gflops": measured["faiss_knn_gflops"],
        "torch_knn_gflops": measured["torch_knn_gflops"],
        "numpy_knn_gflops": measured["numpy_knn_gflops"],
        "knn_shape": measured["shape"],
        "faster_now": measured["choice"],
        "auto_picks": auto["choice"],
        "auto_source": why,
        "cache_dir": str(cpu_search.cache_dir()),
    }


def warnings_for(blas: list[dict[str, Any]], cpu_facts: dict[str, Any]) -> list[str]:
    """One line per BLAS that runs a pre-AVX2 kernel on a CPU with AVX2 or AVX-512."""
    from .engine.cpu_search import is_generic_kernel  # noqa: PLC0415

    have = [f for f in ("avx512f", "avx2") if f in cpu_facts["vector_extensions"]]
    out = []
    for lib in blas:
        arch = lib.get("architecture")
        if is_generic_kernel(arch, cpu_facts["vector_extensions"]):
            out.append(
                f"{lib['library']} (BLAS {lib['version']}) runs its generic {arch} kernel on a CPU with "
                f"{'/'.join(have).upper()}: searches on it run far below this CPU's GEMM rate "
                "(bank.cpu_search: auto picks the fastest search; see the search rates)."
            )
    return out


def collect(measure: bool = True) -> dict[str, Any]:
    """Everything the doctor reports, as strict-JSON-ready data (``measure=False`` skips the timings)."""
    blas = blas_libraries()
    cpu_facts = cpu()
    report: dict[str, Any] = {
        "versions": versions(),
        "cpu": cpu_facts,
        "torch": torch_info(),
        "blas": blas,
        "environment": {k: os.environ[k] for k in BLAS_ENV if k in os.environ},
        "cuda": cuda(),
        "warnings": warnings_for(blas, cpu_facts),
    }
    if measure:
        report["search"] = search()
    return report


def render(report: dict[str, Any]) -> str:
    """The report as the text ``ocbank doctor`` prints."""
    v, c, t, cu = report["versions"], report["cpu"], report["torch"], report["cuda"]
    lines = [f"ocbank {v['ocbank']}  python {v['python']}  numpy {v['numpy']}  torch {v['torch']}  faiss {v['faiss']}"]
    for name in OPTIONAL:
        lines.append(f"{name}: {v[name]}" if v[name] else f"{name}: absent ({v['absent'][name]})")
    exts = " ".join(c["vector_extensions"]) if c["flags_listed"] else "unknown (the OS lists no CPU flags)"
    lines.append(f"cpu: {c['model']} ({c['vendor'] or c['machine']}), {c['logical_cpus']} logical CPUs; vector: {exts}")
    lines.append(f"torch: {t['threads']} threads ({t['interop_threads']} inter-op), MKL {t['mkl']}, "
                 f"kernels {t['cpu_capability']}")
    for lib in report["blas"]:
        lines.append(f"blas: {lib['library']} {lib['internal_api']} {lib['version']}, kernel {lib['architecture']}, "
                     f"{lib['threads']} threads")
    for name, value in report["environment"].items():
        lines.append(f"env: {name}={value}")
    faiss_gpu = "present" if cu["faiss_gpu_build"] else "absent (faiss-cpu)"
    if cu["available"]:
        lines.append(f"cuda: {cu['torch_cuda']}, {', '.join(cu['devices'])}; faiss GPU build: {faiss_gpu}")
    else:
        lines.append(f"cuda: absent (torch sees no CUDA GPU); faiss GPU build: {faiss_gpu}")
    s = report.get("search")
    if s:
        lines.append(f"gemm: numpy {s['numpy_gemm_gflops']:.0f} GFLOP/s, torch {s['torch_gemm_gflops']:.0f} GFLOP/s")
        lines.append(f"exact 1-NN {s['knn_shape']}: faiss.knn {s['faiss_knn_gflops']:.0f} GFLOP/s, "
                     f"torch {s['torch_knn_gflops']:.0f} GFLOP/s, numpy {s['numpy_knn_gflops']:.0f} GFLOP/s; "
                     f"cpu_search auto picks {s['auto_picks']} ({s['auto_source']})")
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def main(json_path: str | None = None, measure: bool = True) -> int:
    """Print the report; with ``json_path`` also write it as strict JSON ("-": JSON on stdout instead)."""
    from .jsonio import dumps, write_json  # noqa: PLC0415

    report = collect(measure=measure)
    if json_path == "-":
        sys.stdout.write(dumps(report))
        return 0
    print(render(report))
    if json_path:
        write_json(json_path, report)
    return 0
