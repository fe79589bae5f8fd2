"""Which GEMM runs the exact CPU searches: faiss's BLAS, torch's or numpy's, picked by measurement.

faiss-cpu wheels bundle their own BLAS, frozen at the wheel's build. On a CPU newer than
that BLAS it can fall back to a generic SSE kernel that runs several times below the
machine's GEMM rate, while torch's BLAS or numpy's runs the same product at full speed. torch's
BLAS is not the fastest everywhere either (MKL, in torch's x86 wheels, runs well below numpy's
OpenBLAS on AMD CPUs), so ``cpu_search="auto"`` measures once per machine:

- the rule first: when the BLAS inside the faiss wheel runs a pre-AVX2 kernel
  (:data:`PRE_AVX2_KERNELS`, as threadpoolctl reports it) on a CPU that has AVX2, it did not
  recognise the CPU, and faiss is left out of the measurement (:func:`generic_faiss_blas`).
  torch and numpy are still measured, not ranked by their kernels' names: MKL names no
  kernel, numpy may link any BLAS, and which of two fitting kernels is faster depends on the
  CPU (MKL on Intel against OpenBLAS on AMD), so only a timing can say;
- :func:`measure` times :func:`~ocbank.engine.knn.cpu_knn` (k = 1) ranked by
  ``faiss.knn``, by ``torch_knn`` and by ``numpy_knn``, interleaved, on one fixed shape. It
  prefers them in the order of :data:`PREFERENCE` (numpy, torch, faiss): a later one is taken
  only when it is at least :data:`MARGIN` faster than each earlier one, since within the margin
  the choice is noise. numpy comes first because its BLAS ships with every numpy release and
  its add path reads the bank's buffers with no conversions; faiss comes last because its
  speed hangs on the BLAS frozen inside its wheel;
- :func:`auto_cpu_search` keeps a measured choice in a small JSON file per machine under
  :func:`cache_dir` (``$OCBANK_CACHE_DIR``, else ``$XDG_CACHE_HOME/ocbank``, else
  ``~/.cache/ocbank``), keyed by :data:`CACHE_FORMAT`, the CPU, the library versions, numpy's
  BLAS (library, version, kernel), torch's thread count and any ``OPENBLAS_CORETYPE`` the user set.
  Concurrent processes may both measure: each writes atomically, so a reader sees a whole file
  or none. An unwritable cache only costs a measurement per process;
- ``$OCBANK_CPU_SEARCH`` ("faiss" | "torch" | "numpy"), when set, is taken before all of these.

Every choice returns the same distances for the same neighbours
(:func:`~ocbank.engine.knn.cpu_knn` recomputes them exactly), and a build re-decides its
near-ties from exact distances (engine/kernel.py), so the choice is about speed only.

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
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..jsonio import write_json
from ._faiss import faiss
from .knn import CPU_SEARCH_BACKENDS, CPU_SEARCHES, cpu_knn

log = logging.getLogger(__name__)

CACHE_ENV = "OCBANK_CACHE_DIR"
# Names the search "auto" takes without measuring (a fleet that wants one choice on every machine,
# or a test session whose processes must not each measure on a loaded machine).
CHOICE_ENV = "OCBANK_CPU_SEARCH"
# The measured shape: one 224^2 image's patches against a mid-sized bank of WideResNet-50 features.
# A smaller product (fewer queries or centroids) ranked the GEMMs differently from the real
# searches on a loaded machine; this one ranks them as builds and scoring do, in about a second idle.
MEASURE_SHAPE = (784, 4096, 1536)  # (queries, centroids, dim)
MEASURE_ROUNDS = 3
# The measured searches in the order they are preferred on a near tie (see the module's docstring).
PREFERENCE = ("numpy", "torch", "faiss")
# A search later in PREFERENCE is picked only when it is at least this much faster than each earlier one.
MARGIN = 1.1
# The cache file's format: a record written under another (a choice among fewer searches) is measured again.
CACHE_FORMAT = 2

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


def bundled_blas(package: str) -> dict[str, Any] | None:
    """The BLAS loaded from a folder named after ``package`` (faiss_cpu.libs, numpy.libs, ...): {"library", "version", "architecture"}.

    As threadpoolctl reports it; None when threadpoolctl is missing or no such BLAS is loaded
    (the package links a BLAS from outside its folder).
    """
    try:
        import threadpoolctl  # noqa: PLC0415
    except ImportError:
        return None
    for info in threadpoolctl.threadpool_info():
        path = Path(info.get("filepath") or "")
        if info.get("user_api") == "blas" and any(part.startswith(package) for part in path.parent.parts):
            return {"library": path.name, "version": info.get("version"), "architecture": info.get("architecture")}
    return None


@cache  # fixed once numpy is loaded (its kernel too: OpenBLAS reads OPENBLAS_CORETYPE at load), and not free to ask
def numpy_blas() -> dict[str, Any]:
    """numpy's BLAS: {"library", "version", "architecture"}.

    From threadpoolctl when numpy bundles it (a wheel's numpy.libs); else numpy's build
    configuration names it (a system or conda BLAS), without its kernel.
    """
    bundled = bundled_blas("numpy")
    if bundled is not None:
        return bundled
    blas = getattr(np, "__config__", None) and getattr(np.__config__, "CONFIG", {}).get("Build Dependencies", {})
    blas = (blas or {}).get("blas", {})
    return {"library": blas.get("name"), "version": blas.get("version"), "architecture": None}


def machine_key() -> dict[str, Any]:
    """What the fastest search depends on: the CPU, the libraries (numpy's BLAS too), the threads and a user-set OpenBLAS core type."""
    import torch  # noqa: PLC0415

    cpu = cpu_info()
    return {
        "format": CACHE_FORMAT,
        "cpu": cpu["model"],
        "flags_sha": hashlib.sha256(" ".join(cpu["flags"]).encode()).hexdigest()[:12],
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "numpy_blas": numpy_blas(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
    }


def measure(
    shape: tuple[int, int, int] | None = None, rounds: int = MEASURE_ROUNDS, searches: tuple[str, ...] = PREFERENCE,
) -> dict[str, Any]:
    """Time exact k=1 search with each of ``searches``, interleaved; return their rates and the choice.

    Returns {"<search>_knn_gflops" for each measured search, "choice", "shape": [n, K, dim]}: the
    choice is the first of :data:`PREFERENCE` that no later search beats by :data:`MARGIN`.
    Each rate is the best of ``rounds`` (after one warm-up), so a burst of load on a shared machine
    lowers every side's worst runs rather than deciding the choice.
    """
    unknown = [name for name in searches if name not in CPU_SEARCH_BACKENDS]
    if unknown or not searches:
        msg = f"measure times searches among {CPU_SEARCH_BACKENDS}, got {searches!r}. Name at least one of them."
        raise InputError(msg)
    n, big_k, dim = MEASURE_SHAPE if shape is None else shape
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((n, dim), dtype=np.float32)
    means = rng.standard_normal((big_k, dim), dtype=np.float32)
    norms = (means.astype(np.float64) ** 2).sum(1)
    runs = {name: partial(cpu_knn, queries, means, 1, name, norms) for name in PREFERENCE if name in searches}
    best = dict.fromkeys(runs, float("inf"))
    for round_ in range(rounds + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_:  # round 0 warms up every side
                best[name] = min(best[name], time.perf_counter() - start)
    choice = None
    for name in runs:  # in PREFERENCE order
        if choice is None or best[name] * MARGIN < best[choice]:
            choice = name
    flops = 2.0 * n * big_k * dim
    return {**{f"{name}_knn_gflops": flops / seconds / 1e9 for name, seconds in best.items()},
            "choice": choice, "shape": [n, big_k, dim]}


def is_generic_kernel(architecture: str | None, cpu_flags: list[str]) -> bool:
    """Whether a BLAS kernel named ``architecture`` leaves a CPU with these flags' AVX2 unused."""
    return bool(architecture) and architecture.lower() in PRE_AVX2_KERNELS and "avx2" in cpu_flags


def generic_faiss_blas() -> dict[str, Any] | None:
    """The BLAS bundled in the faiss wheel when it runs a pre-AVX2 kernel on an AVX2 CPU, else None.

    Returns {"library", "version", "architecture"} from threadpoolctl; None also when
    threadpoolctl is missing or faiss links a BLAS outside its wheel (then nothing is known).
    """
    bundled = bundled_blas("faiss")
    return bundled if bundled is not None and is_generic_kernel(bundled["architecture"], cpu_info()["flags"]) else None


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
    if not isinstance(record, dict) or record.get("key") != key or record.get("choice") not in CPU_SEARCH_BACKENDS:
        return None
    return record


def auto_cpu_search() -> dict[str, Any]:
    """What ``cpu_search="auto"`` takes on this machine, and why: $OCBANK_CPU_SEARCH, the cache, or a measurement now.

    Returns {"choice", "source": "env" | "cache" | "measured" | "rule", "key"} plus, unless pinned,
    :func:`measure`'s rates; "rule" is a measurement now that left faiss out, whose generic BLAS is
    named in "generic_blas" (kept in the cached record too).
    """
    key = machine_key()
    pinned = os.environ.get(CHOICE_ENV)
    if pinned:
        if pinned not in CPU_SEARCH_BACKENDS:
            msg = f"${CHOICE_ENV} must be one of {CPU_SEARCH_BACKENDS}, got {pinned!r}. Set one, or unset it to measure."
            raise InputError(msg)
        return {"choice": pinned, "source": "env", "key": key}
    memo_key = json.dumps(key, sort_keys=True)
    with _memo_lock:  # one decision per process, even when banks are made from several threads
        record = _memo.get(memo_key)
        if record is None:
            record = _decide(key)
            _memo[memo_key] = record
        return record


def _decide(key: dict[str, Any]) -> dict[str, Any]:
    generic = generic_faiss_blas()
    cached = cached_choice(key)
    # The rule is read again each process (cheap): a choice cached with it applies only with it, and vice versa.
    if cached is not None and cached.get("generic_blas") == generic:
        return {**cached, "source": "cache"}
    if generic is None:
        record = {**measure(), "key": key}
    else:
        record = {**measure(searches=tuple(s for s in PREFERENCE if s != "faiss")), "generic_blas": generic, "key": key}
    try:
        write_json(_cache_path(key), record)
    except OSError as exc:
        log.warning("could not cache the CPU search choice in %s (%s): it is measured once per process",
                    cache_dir(), exc)
    return {**record, "source": "measured" if generic is None else "rule"}


def resolve_cpu_search(search: str) -> str:
    """The concrete CPU search for ``cpu_search``: "faiss", "torch" or "numpy" ("auto": :func:`auto_cpu_search`'s choice)."""
    if search not in CPU_SEARCHES:
        msg = f"cpu_search must be one of {CPU_SEARCHES}, got {search!r}. Use 'auto'."
        raise InputError(msg)
    return auto_cpu_search()["choice"] if search == "auto" else search


def exact_knn(queries: np.ndarray, base: np.ndarray, k: int, search: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of queries [n, dim] among base rows [m, dim] (float32 numpy), like ``faiss.knn``.

    Returns (squared L2 float32 [n, k'], ids int64 [n, k']), k' = min(k, m): ranked on the GEMM
    ``search`` names (``cpu_search``'s vocabulary; "auto" is the measured choice), with
    :func:`~ocbank.engine.knn.cpu_knn`'s exact distances, the same whichever GEMM ranked.
    """
    return cpu_knn(queries, base, k, resolve_cpu_search(search))
