"""Which GEMM runs the exact CPU searches: faiss's BLAS or torch's, picked by measurement.

faiss-cpu wheels bundle their own BLAS, frozen at the wheel's build. On a CPU newer than
that BLAS it can fall back to a generic SSE kernel that runs several times below the
machine's GEMM rate, while torch's BLAS (or numpy's) runs the same product at full speed.
Neither is faster everywhere, so ``cpu_search="auto"`` measures both once per machine:

- the rule first: when the BLAS inside the faiss wheel runs a pre-AVX2 kernel
  (:data:`PRE_AVX2_KERNELS`, as threadpoolctl reports it) on a CPU that has AVX2, it did not
  recognise the CPU, and torch is taken without measuring (:func:`generic_faiss_blas`);
- otherwise :func:`measure` times ``faiss.knn`` and
  :func:`~ocbank.engine.store.exact_torch_knn` (k = 1) side by side, interleaved, on one
  fixed shape, and picks the faster (torch on a near tie: its speed does not hang on the
  BLAS frozen inside the faiss wheel);
- :func:`auto_cpu_search` keeps a measured choice in a small JSON file per machine under
  :func:`cache_dir` (``$OCBANK_CACHE_DIR``, else ``$XDG_CACHE_HOME/ocbank``, else
  ``~/.cache/ocbank``), keyed by the CPU, the library versions, the thread count and any
  ``OPENBLAS_CORETYPE`` the user set. Concurrent processes may both measure: each writes
  atomically, so a reader sees a whole file or none. An unwritable cache only costs a
  measurement per process.

No BLAS core type is ever forced here: a forced kernel can compute wrong results on a CPU
it does not fit. This module and the bank file are the engine's only file I/O.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..jsonio import write_json
from ._faiss import faiss
from .store import SEARCH_BACKENDS, SEARCHES, exact_torch_knn

log = logging.getLogger(__name__)

CACHE_ENV = "OCBANK_CACHE_DIR"
# The measured shape: one 224^2 image's patches against a mid-sized bank of WideResNet-50 features.
# A smaller product (fewer queries or centroids) ranked the two GEMMs differently from the real
# searches on a loaded machine; this one ranks them as builds and scoring do, in about a second idle.
MEASURE_SHAPE = (784, 4096, 1536)  # (queries, centroids, dim)
MEASURE_ROUNDS = 3
# faiss is picked only when it is at least this much faster: within the margin the choice is noise.
FAISS_MARGIN = 1.1

# OpenBLAS kernels (threadpoolctl's "architecture") that use no AVX2: on a CPU that has AVX2 or
# AVX-512 they mean the library did not recognise the CPU and fell back to an older generic kernel.
PRE_AVX2_KERNELS = frozenset({
    "generic", "prescott", "core2", "penryn", "dunnington", "nehalem", "atom", "katmai", "coppermine", "northwood",
    "banias", "athlon", "opteron", "opteron_sse3", "barcelona", "bobcat", "nano", "sandybridge",
})

_memo: dict[str, dict[str, Any]] = {}
_memo_lock = threading.Lock()


def cache_dir() -> Path:
    """Where ocbank caches per-machine facts: $OCBANK_CACHE_DIR, else $XDG_CACHE_HOME/ocbank, else ~/.cache/ocbank."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"  # XDG: relative paths are invalid
    return base / "ocbank"


def cpu_info() -> dict[str, Any]:
    """{"model": the CPU's name or None, "vendor": ..., "flags": sorted CPU flags ([] where the OS does not list them)}.

    Read from /proc/cpuinfo on Linux; elsewhere only ``platform.processor()`` is known.
    """
    model = vendor = None
    flags: list[str] = []
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if name == "model name" and model is None:
            model = value
        elif name == "vendor_id" and vendor is None:
            vendor = value
        elif name in ("flags", "Features") and not flags:  # x86 | arm64
            flags = sorted(set(value.split()))
    return {"model": model or platform.processor() or None, "vendor": vendor, "flags": flags}


def machine_key() -> dict[str, Any]:
    """What the faster search depends on: the CPU, the libraries, the threads and a user-set OpenBLAS core type."""
    import torch  # noqa: PLC0415

    cpu = cpu_info()
    return {
        "cpu": cpu["model"],
        "flags_sha": hashlib.sha256(" ".join(cpu["flags"]).encode()).hexdigest()[:12],
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss.__version__,
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
    }


def measure(shape: tuple[int, int, int] | None = None, rounds: int = MEASURE_ROUNDS) -> dict[str, Any]:
    """Time exact k=1 search with faiss and with torch, interleaved; return both rates and the faster one.

    Returns {"faiss_knn_gflops", "torch_knn_gflops", "choice": "faiss" | "torch", "shape": [n, K, dim]}.
    Each rate is the best of ``rounds`` (after one warm-up), so a burst of load on a shared machine
    lowers both sides' worst runs rather than deciding the choice.
    """
    import torch  # noqa: PLC0415

    n, big_k, dim = MEASURE_SHAPE if shape is None else shape
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((n, dim), dtype=np.float32)
    means = rng.standard_normal((big_k, dim), dtype=np.float32)
    q_t, m_t = torch.from_numpy(queries), torch.from_numpy(means)
    norms = (m_t.double() ** 2).sum(1)
    runs = {"faiss": lambda: faiss.knn(queries, means, 1), "torch": lambda: exact_torch_knn(q_t, m_t, norms, 1)}
    best = dict.fromkeys(runs, float("inf"))
    for round_ in range(rounds + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_:  # round 0 warms up both
                best[name] = min(best[name], time.perf_counter() - start)
    flops = 2.0 * n * big_k * dim
    choice = "faiss" if best["faiss"] * FAISS_MARGIN < best["torch"] else "torch"
    return {
        "faiss_knn_gflops": flops / best["faiss"] / 1e9,
        "torch_knn_gflops": flops / best["torch"] / 1e9,
        "choice": choice,
        "shape": [n, big_k, dim],
    }


def is_generic_kernel(architecture: str | None, cpu_flags: list[str]) -> bool:
    """Whether a BLAS kernel named ``architecture`` leaves a CPU with these flags' AVX2 unused."""
    return bool(architecture) and architecture.lower() in PRE_AVX2_KERNELS and "avx2" in cpu_flags


def generic_faiss_blas() -> dict[str, Any] | None:
    """The BLAS bundled in the faiss wheel when it runs a pre-AVX2 kernel on an AVX2 CPU, else None.

    Returns {"library", "version", "architecture"} from threadpoolctl; None also when
    threadpoolctl is missing or faiss links a BLAS outside its wheel (then nothing is known).
    """
    try:
        import threadpoolctl  # noqa: PLC0415
    except ImportError:
        return None
    flags = cpu_info()["flags"]
    for info in threadpoolctl.threadpool_info():
        path = Path(info.get("filepath") or "")
        if info.get("user_api") != "blas" or not any(part.startswith("faiss") for part in path.parent.parts):
            continue
        if is_generic_kernel(info.get("architecture"), flags):
            return {"library": path.name, "version": info.get("version"), "architecture": info.get("architecture")}
    return None


def _cache_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "cpu_search" / f"{digest}.json"


def cached_choice(key: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The cached measurement for this machine (see :func:`measure`, plus "key"), or None when absent or unusable."""
    key = machine_key() if key is None else key
    try:
        record = json.loads(_cache_path(key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or record.get("choice") not in SEARCH_BACKENDS:
        return None
    return record


def auto_cpu_search() -> dict[str, Any]:
    """What ``cpu_search="auto"`` takes on this machine, and why: the rule, the cache, or a measurement now.

    Returns {"choice", "source": "rule" | "cache" | "measured", "key"} plus, by source, the
    generic BLAS that decided ("generic_blas") or :func:`measure`'s rates.
    """
    key = machine_key()
    memo_key = json.dumps(key, sort_keys=True)
    with _memo_lock:  # one decision per process, even when banks are made from several threads
        record = _memo.get(memo_key)
        if record is None:
            record = _decide(key)
            _memo[memo_key] = record
        return record


def _decide(key: dict[str, Any]) -> dict[str, Any]:
    generic = generic_faiss_blas()
    if generic is not None:
        return {"choice": "torch", "source": "rule", "generic_blas": generic, "key": key}
    cached = cached_choice(key)
    if cached is not None:
        return {**cached, "source": "cache"}
    record = {**measure(), "key": key}
    try:
        write_json(_cache_path(key), record)
    except OSError as exc:
        log.warning("could not cache the CPU search choice in %s (%s): it is measured once per process",
                    cache_dir(), exc)
    return {**record, "source": "measured"}


def resolve_cpu_search(search: str) -> str:
    """The concrete CPU search for ``cpu_search``: "faiss" or "torch" ("auto": :func:`auto_cpu_search`'s choice)."""
    if search not in SEARCHES:
        msg = f"cpu_search must be one of {SEARCHES}, got {search!r}. Use 'auto'."
        raise InputError(msg)
    return auto_cpu_search()["choice"] if search == "auto" else search


def exact_knn(queries: np.ndarray, base: np.ndarray, k: int, search: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of queries [n, dim] among base rows [m, dim] (float32 numpy), like ``faiss.knn``.

    Returns (squared L2 float32 [n, k'], ids int64 [n, k']), k' = min(k, m), on the GEMM
    ``search`` names (``cpu_search``'s vocabulary; "auto" is the measured choice).
    """
    if resolve_cpu_search(search) == "faiss":
        return faiss.knn(queries, base, k)
    import torch  # noqa: PLC0415

    q = torch.from_numpy(queries if queries.flags.writeable else queries.copy())
    b = torch.from_numpy(base if base.flags.writeable else base.copy())
    dist, ids = exact_torch_knn(q, b, (b.double() ** 2).sum(1), k)
    return dist.numpy(), ids.numpy()
