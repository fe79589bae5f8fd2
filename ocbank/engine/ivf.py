"""Approximate 1-NN search over a large bank's means: a FAISS inverted-file (IVF) index, CPU, search only.

A bank over all classes can hold 10^5+ centroids; exact flat search then costs
2 * d * K FLOP per query patch. An ``IndexIVFFlat`` clusters the means into
``nlist`` lists (k-means on the means) and scans only the ``nprobe`` nearest
lists per query. Distances to the centroids it does visit are exact, so a miss
only ever *over*-estimates a patch's 1-NN distance. Build it from a finished
bank's ``means``; the bank itself (and its build) is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError, InputTypeError
from ._faiss import faiss

# Below this many centroids flat search is fast enough and exact: use IVF above it.
IVF_MIN_CENTROIDS = 50_000
# k-means training points per list and iterations. Training costs ~ 2 * d * nlist^2 * points
# per list * iterations, the IVF build's dominant term, so both are kept low: the lists only route
# queries, and nprobe lists are scanned exactly (FAISS warns below 39 points per list; recall at
# these settings: benchmarks/results/ivf_cpu.json).
TRAIN_POINTS_PER_LIST = 20
KMEANS_ITERATIONS = 10


def default_nlist(n_centroids: int) -> int:
    """~4 * sqrt(K) lists (FAISS's rule of thumb), at least 1 and at most K / 8."""
    return max(1, min(int(round(4 * math.sqrt(n_centroids))), n_centroids // 8 or 1))


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: 32 (or all of them when nlist < 32).

    32 is the smallest nprobe that left the demo's image AUROC unchanged against flat
    search; recall, distance error and speed per nprobe are in
    benchmarks/results/ivf_cpu.json (``python -m benchmarks.bench_search --ivf``).
    """
    return max(1, min(nlist, 32))


def use_ivf(n_centroids: int, threshold: int = IVF_MIN_CENTROIDS) -> bool:
    """Whether a bank of ``n_centroids`` should be searched through IVF rather than flat."""
    return n_centroids >= threshold


def _check_rows(x: Any, name: str, dim: int | None = None) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        msg = f"{name} must be a numpy array [n, d], got {type(x).__name__!r}. Convert with np.asarray."
        raise InputTypeError(msg)
    if x.ndim != 2 or x.shape[0] == 0 or (dim is not None and x.shape[1] != dim):
        want = f"[n >= 1, {dim}]" if dim is not None else "[n >= 1, d]"
        msg = f"{name} must have shape {want}, got {x.shape!r}. Reshape it."
        raise InputError(msg)
    if not np.issubdtype(x.dtype, np.floating):
        msg = f"{name} must be floating point, got dtype {x.dtype!r}. Pass float32."
        raise InputTypeError(msg)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        msg = f"{name} contains NaN or inf values, got {int((~np.isfinite(x)).any(axis=1).sum())} such rows. Drop them."
        raise InputError(msg)
    return x


@dataclass(frozen=True)
class IvfParams:
    """The index's shape: ``nlist`` inverted lists, ``nprobe`` scanned per query, k-means ``seed``."""

    nlist: int
    nprobe: int
    seed: int = 0


class IvfSearch:
    """1-NN search over fixed means [K, d] through ``faiss.IndexIVFFlat`` (L2); answers like ``faiss.knn``."""

    def __init__(self, index: Any, params: IvfParams, n_centroids: int, dim: int) -> None:
        self.index = index
        self.params = params
        self.n_centroids = n_centroids
        self.dim = dim

    @classmethod
    def from_means(
        cls, means: np.ndarray, nlist: int | None = None, nprobe: int | None = None, seed: int = 0
    ) -> IvfSearch:
        """Train the coarse quantiser on (a seeded sample of) the means and add them all.

        means: [K, d] float32. ``nlist`` defaults to :func:`default_nlist`,
        ``nprobe`` to :func:`default_nprobe`; ``nprobe = nlist`` scans every list
        (exact, equal to flat search).
        """
        x = _check_rows(means, "means")
        k, d = x.shape
        nlist = default_nlist(k) if nlist is None else nlist
        if not (isinstance(nlist, int) and 1 <= nlist <= k):
            msg = f"nlist must be an integer in [1, {k}] (the number of means), got {nlist!r}. Use None for ~4*sqrt(K)."
            raise InputError(msg)
        nprobe = default_nprobe(nlist) if nprobe is None else nprobe
        if not (isinstance(nprobe, int) and 1 <= nprobe <= nlist):
            msg = f"nprobe must be an integer in [1, nlist={nlist}], got {nprobe!r}. Use None for the default."
            raise InputError(msg)
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
        index.cp.seed = seed
        index.cp.niter = KMEANS_ITERATIONS
        index.cp.min_points_per_centroid = 1  # a sampled training set smaller than 39 * nlist is intended
        index.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
        n_train = min(k, nlist * TRAIN_POINTS_PER_LIST)
        train = x if n_train == k else x[np.sort(np.random.default_rng(seed).choice(k, n_train, replace=False))]
        index.train(train)
        index.add(x)
        index.nprobe = nprobe
        return cls(index, IvfParams(nlist, nprobe, seed), k, d)

    def with_nprobe(self, nprobe: int) -> IvfSearch:
        """The same index scanning ``nprobe`` lists (shares the trained lists)."""
        if not (isinstance(nprobe, int) and 1 <= nprobe <= self.params.nlist):
            msg = f"nprobe must be an integer in [1, nlist={self.params.nlist}], got {nprobe!r}. Pick a smaller value."
            raise InputError(msg)
        self.index.nprobe = nprobe
        self.params = IvfParams(self.params.nlist, nprobe, self.params.seed)
        return self

    def __len__(self) -> int:
        return self.n_centroids

    def search(self, q: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """q [n, d] -> (squared L2 distances [n, k] float32, ids [n, k] int64), nearest first, like ``faiss.knn``."""
        x = _check_rows(q, "queries", self.dim)
        if not (isinstance(k, int) and 1 <= k <= self.n_centroids):
            msg = f"k must be an integer in [1, {self.n_centroids}], got {k!r}. Ask for fewer neighbours."
            raise InputError(msg)
        sq, ids = self.index.search(x, k)
        return sq, ids
