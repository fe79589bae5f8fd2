"""Centroid storage and FAISS search for :class:`ocbank.ClusterBank`.

Both stores satisfy one contract, :class:`Store`: ``reserve`` grows the buffers,
``absorb`` feeds weighted rows through Algorithm 1 (stopping early when a
centroid cap is reached), ``search`` answers k-NN queries, and ``state`` /
``set_state`` move (means, counts, m2) in and out. The bookkeeping they share
(size, capacity growth, the host-side counts and Welford second moments, the
chunk loop around :func:`~ocbank.engine.kernel.resolve_chunk`) lives once, in
:class:`_StoreBase`; a store only says how a chunk is searched and how its
decisions are applied to the means. Neither keeps a copy of the vectors in a
separate index, so the searched structure can never go stale.

- :class:`CpuStore`: numpy buffers searched with ``faiss.pairwise_distances`` and
  ``faiss.knn`` (faiss-cpu), or with the same exact products on torch's GEMM
  (``search="torch"``, tensors sharing the numpy buffers) or on numpy's
  (``search="numpy"``, :func:`~ocbank.engine.knn.numpy_knn`); the kernel updates the means in place (Welford).
- :class:`TorchStore`: torch buffers on a device (CUDA in production), searched
  with ``faiss.knn_gpu`` (``search="faiss"``, needs a faiss GPU build) or with
  torch itself (``search="torch"``, :func:`~ocbank.engine.knn.torch_knn`: a GEMM plus ``topk``,
  chunked under :data:`~ocbank.engine.knn.SEARCH_BLOCK_BYTES`), so a CUDA torch with the
  faiss-cpu wheel is enough. The kernel decides on the host from small
  per-chunk arrays and the means are updated on the device. The torch search
  also runs on CPU tensors (the same code path, for tests and checks).

A store is not thread-safe for mutation: :class:`~ocbank.engine.bank.ClusterBank`
serialises writers. :class:`TorchStore` also serialises its own searches, because
GPU faiss resources are not thread-safe even for reading.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numba import njit

from ..errors import DeviceError, InputError
from ._faiss import faiss, faiss_has_gpu
from .kernel import FULL, Book, Chunk, Search, resolve_chunk
from .knn import (
    CPU_SEARCH_BACKENDS,
    HALF_SEARCH_CANDIDATES,
    SEARCH_BLOCK_BYTES,
    SEARCH_PRECISIONS,
    SEARCHES,
    cpu_knn,
    rerank_exact,
    sq_norms,
    torch_knn,
    torch_view,
)

# Upper bound on floats in one chunk's distance block (b x K): 128 MiB.
_MAX_BLOCK_FLOATS = 1 << 25
_MAX_CHUNK_ROWS = 1024
_MIN_CHUNK_ROWS = 64
NO_LIMIT = int(np.iinfo(np.int64).max)


def chunk_rows(n_centroids: int) -> int:
    """Rows per kernel call so that the distance block stays bounded."""
    rows = _MAX_BLOCK_FLOATS // max(n_centroids, 1)
    return int(min(_MAX_CHUNK_ROWS, max(_MIN_CHUNK_ROWS, rows)))


def _grown_capacity(current: int, needed: int) -> int:
    capacity = max(current, 256)
    while capacity < needed:
        capacity *= 2
    return capacity


@njit(cache=True, nogil=True)
def _finish_distances(dist: np.ndarray, col_norms: np.ndarray, row_norms: np.ndarray) -> None:
    """dist [b, K] float32 = -2 x mu^T, in place -> max((dist + ||mu||^2) + ||x||^2, 0) in fp32.

    col_norms [K] and row_norms [b] float32. The three numpy passes this replaces round the
    same; one pass over a block that outgrows the cache is what it saves.
    """
    zero = np.float32(0)
    for i in range(dist.shape[0]):
        xn = row_norms[i]
        for j in range(dist.shape[1]):
            d = (dist[i, j] + col_norms[j]) + xn
            dist[i, j] = d if d > zero else zero


def _grow(arr: np.ndarray, capacity: int, size: int) -> np.ndarray:
    out = np.zeros((capacity, *arr.shape[1:]), dtype=arr.dtype)
    out[:size] = arr[:size]
    return out


@runtime_checkable
class Store(Protocol):
    """What :class:`~ocbank.engine.bank.ClusterBank` needs from a centroid store."""

    dim: int
    size: int

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` centroids."""

    def rows(self, x: np.ndarray) -> Any:
        """float32 [n, dim] numpy rows in this store's native form."""

    def absorb(self, X: Any, weights: np.ndarray, pm2: np.ndarray | None = None, limit: int = NO_LIMIT) -> int:
        """Feed rows [n, dim] with weights [n] (and carried M2 [n]); return rows consumed (< n only at ``limit``)."""

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances float32 [n, k'], ids int64 [n, k']), k' = min(k, size)."""

    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of (means float32 [K, dim], counts int64 [K], m2 float64 [K])."""

    def set_state(self, means: np.ndarray, counts: np.ndarray, m2: np.ndarray) -> None:
        """Replace the contents with K centroids."""


class _StoreBase:
    """Shared bookkeeping: size, capacity, host counts [cap] and m2 [cap], the chunk loop."""

    def __init__(self, dim: int, radius: float) -> None:
        self.dim = dim
        self.r2 = float(radius) * float(radius)
        self.size = 0
        self.capacity = 0
        self._counts = np.zeros(0, dtype=np.int64)
        self._m2 = np.zeros(0, dtype=np.float64)

    # -- subclass hooks
    def _grow_buffers(self, capacity: int) -> None:
        raise NotImplementedError

    def _set_means(self, means: np.ndarray) -> None:
        raise NotImplementedError

    def _prepare(self, chunk: Any, weights: np.ndarray, pm2: np.ndarray, k0: int) -> tuple[Chunk, Search, Book]:
        raise NotImplementedError

    def _apply(self, chunk: Any, weights: np.ndarray, assign: np.ndarray, k_new: int) -> None:
        raise NotImplementedError

    # -- shared
    def reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = _grown_capacity(self.capacity, needed)
        self._counts = _grow(self._counts, capacity, self.size)
        self._m2 = _grow(self._m2, capacity, self.size)
        self._grow_buffers(capacity)
        self.capacity = capacity

    @property
    def counts(self) -> np.ndarray:
        view = self._counts[: self.size]
        view.flags.writeable = False
        return view

    @property
    def m2(self) -> np.ndarray:
        view = self._m2[: self.size]
        view.flags.writeable = False
        return view

    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.array(self.means, dtype=np.float32), self.counts.copy(), self.m2.copy()

    def set_state(self, means: np.ndarray, counts: np.ndarray, m2: np.ndarray) -> None:
        k = means.shape[0]
        self.size = 0
        self.reserve(k)
        self._counts[:k] = counts
        self._m2[:k] = m2
        self._set_means(np.ascontiguousarray(means, dtype=np.float32))
        self.size = k

    def add(self, X: Any, weights: np.ndarray) -> None:
        """Stream every row of X [n, dim] with integer weights [n] (no cap)."""
        self.absorb(X, weights)

    def absorb(self, X: Any, weights: np.ndarray, pm2: np.ndarray | None = None, limit: int = NO_LIMIT) -> int:
        """Stream rows of X [n, dim] with integer weights [n]; return how many were consumed.

        Fewer than n are consumed only when row ``returned`` needs a new centroid
        and the store already holds ``limit``: the rows before it are applied.
        """
        n = X.shape[0]
        weights = np.ascontiguousarray(weights, dtype=np.int64)
        pm2 = np.zeros(n, dtype=np.float64) if pm2 is None else np.ascontiguousarray(pm2, dtype=np.float64)
        start = 0
        while start < n:
            k0 = self.size
            stop = min(n, start + chunk_rows(k0))
            self.reserve(k0 + stop - start)
            chunk = X[start:stop]
            w = weights[start:stop]
            ch, se, book = self._prepare(chunk, w, pm2[start:stop], k0)
            assign = np.empty(stop - start, dtype=np.int64)
            consumed, k_new, why = resolve_chunk(ch, se, book, k0, self.r2, int(limit), assign)
            self._apply(chunk[:consumed], w[:consumed], assign[:consumed], k_new)
            self.size = k_new
            start += consumed
            if why == FULL:
                break
        return start


class CpuStore(_StoreBase):
    """Doubling numpy buffers of means [cap, dim], counts [cap], m2 [cap].

    ``search`` says whose GEMM forms the distances (fp32, squared L2, ||x||^2 - 2 x mu + ||mu||^2):
    "faiss" (``faiss.pairwise_distances`` / ``faiss.knn``, on the BLAS inside the faiss
    wheel), "torch" (``torch.addmm`` / :func:`~ocbank.engine.knn.torch_knn` on tensors that share the
    numpy buffers, on torch's BLAS) or "numpy" (``np.matmul`` into a reused buffer /
    :func:`~ocbank.engine.knn.numpy_knn`, on numpy's BLAS). The kernel's decisions and in-place updates are the same,
    and :meth:`search` returns every search's neighbours with the same exact distances (:func:`~ocbank.engine.knn.cpu_knn`).
    """

    def __init__(self, dim: int, radius: float, search: str = "faiss") -> None:
        super().__init__(dim, radius)
        if search not in CPU_SEARCH_BACKENDS:
            msg = f"a CPU store searches with one of {CPU_SEARCH_BACKENDS}, got {search!r}. Resolve 'auto' first."
            raise InputError(msg)
        self.search_backend = search
        self._torch = None
        if search == "torch":
            import torch  # noqa: PLC0415

            self._torch = torch
        self._means = np.zeros((0, dim), dtype=np.float32)
        self._norms = np.zeros(0, dtype=np.float64)
        # The numpy search's distance block when adding, kept across chunks (writers are serialised):
        # a fresh block of this size per chunk would have its pages faulted in again each time.
        self._block = np.zeros(0, dtype=np.float32)

    def _grow_buffers(self, capacity: int) -> None:
        self._means = _grow(self._means, capacity, self.size)
        self._norms = _grow(self._norms, capacity, self.size)

    @property
    def means(self) -> np.ndarray:
        view = self._means[: self.size]
        view.flags.writeable = False
        return view

    def rows(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32)

    def _set_means(self, means: np.ndarray) -> None:
        k = means.shape[0]
        self._means[:k] = means
        self._norms[:k] = sq_norms(self._means[:k])

    def _prepare(self, chunk: np.ndarray, weights: np.ndarray, pm2: np.ndarray, k0: int) -> tuple[Chunk, Search, Book]:
        b = chunk.shape[0]
        xn = sq_norms(chunk)
        if not k0:
            dist = np.zeros((b, 0), dtype=np.float32)
        elif self.search_backend == "faiss":
            dist = faiss.pairwise_distances(chunk, self._means[:k0])
        elif self.search_backend == "torch":
            dist = self._torch_distances(chunk, xn, k0)
        else:
            dist = self._numpy_distances(chunk, xn, k0)
        ch = Chunk(chunk, weights, pm2, xn, chunk @ chunk.T)
        cand = np.zeros((b, 0), dtype=np.int64)
        se = Search(dist, np.arange(k0, dtype=np.int64), self._norms[:k0], cand, True, True)
        return ch, se, Book(self._means, self._counts, self._m2)

    def _torch_distances(self, chunk: np.ndarray, xn: np.ndarray, k0: int) -> np.ndarray:
        """Squared L2 [b, k0] float32 of chunk [b, dim] to the first k0 means: ||x||^2 - 2 x mu^T + ||mu||^2, >= 0.

        The form ``faiss.pairwise_distances`` computes, on torch's GEMM.
        """
        torch = self._torch
        x = torch_view(torch, chunk)
        means = torch.from_numpy(self._means[:k0])
        norms = torch.from_numpy(self._norms[:k0]).float()
        dist = torch.addmm(norms[None, :], x, means.T, beta=1, alpha=-2)
        dist += torch.from_numpy(xn).float()[:, None]
        return dist.clamp_(min=0).numpy()

    def _numpy_distances(self, chunk: np.ndarray, xn: np.ndarray, k0: int) -> np.ndarray:
        """:meth:`_torch_distances`' [b, k0] float32 on numpy's GEMM, in the store's reused block (the kernel's to overwrite).

        The same fp32 operations in the same order: -2 x mu^T (scaling x by -2 is exact), + ||mu||^2, + ||x||^2, >= 0.
        """
        b = chunk.shape[0]
        if self._block.size < b * k0:
            self._block = np.empty(_grown_capacity(self._block.size, b * k0), dtype=np.float32)
        dist = self._block[: b * k0].reshape(b, k0)
        np.matmul(chunk * np.float32(-2), self._means[:k0].T, out=dist)
        _finish_distances(dist, self._norms[:k0].astype(np.float32), xn.astype(np.float32))
        return dist

    def _apply(self, chunk: np.ndarray, weights: np.ndarray, assign: np.ndarray, k_new: int) -> None:
        # The kernel moved the means in place; refresh the norms it touched.
        touched = np.unique(assign)
        self._norms[touched] = sq_norms(self._means[touched])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [n, dim] float32 -> (squared distances [n, k'] float32, ids [n, k'] int64), k' = min(k, size).

        The distances are :func:`~ocbank.engine.knn.cpu_knn`'s exact ones: the same whichever GEMM ranked.
        """
        size = self.size
        return cpu_knn(queries, self._means[:size], k, self.search_backend, self._norms[:size])


def resolve_search(search: str, device: str, precision: str = "fp32") -> str:
    """The concrete search of a store on ``device``: "faiss" or "torch".

    On the CPU the plain faiss store is used unless ``search == "torch"``, which runs the
    torch store on CPU tensors. On CUDA, "auto" picks faiss when its GPU build is present
    and the precision is fp32 (faiss searches fp32 only here), else torch.
    """
    if search not in SEARCHES:
        msg = f"gpu_search must be one of {SEARCHES}, got {search!r}. Use 'auto'."
        raise InputError(msg)
    if precision not in SEARCH_PRECISIONS:
        msg = f"gpu_search_precision must be one of {SEARCH_PRECISIONS}, got {precision!r}. Use 'fp32'."
        raise InputError(msg)
    if search == "faiss" and precision != "fp32":
        msg = (
            f"gpu_search='faiss' searches in fp32 only, got gpu_search_precision={precision!r}. "
            "Use gpu_search='torch' (or 'auto') for half-precision candidates."
        )
        raise InputError(msg)
    if device == "cpu":
        return "torch" if search == "torch" else "faiss"
    if search == "auto":
        return "faiss" if precision == "fp32" and faiss_has_gpu() else "torch"
    if search == "faiss" and not faiss_has_gpu():
        msg = (
            f"gpu_search='faiss' on device {device!r} needs a faiss GPU build, and this faiss has none. "
            "Use gpu_search='torch' (or 'auto'), or install the GPU build: pip install '.[gpu]'."
        )
        raise DeviceError(msg)
    return search


class TorchStore(_StoreBase):
    """Torch buffers on one device, searched with ``faiss.knn_gpu`` or :func:`~ocbank.engine.knn.torch_knn`.

    Per chunk only small arrays cross to the host: the distances to the union of
    the chunk's top-``n_candidates`` centroids [b, u], the candidate lists
    [b, m] and the Gram matrix [b, b]. The host decides (and keeps counts and
    m2), the device updates the means.
    """

    def __init__(
        self,
        dim: int,
        radius: float,
        device: str,
        n_candidates: int = 16,
        *,
        search: str = "torch",
        precision: str = "fp32",
    ) -> None:
        import torch  # noqa: PLC0415

        super().__init__(dim, radius)
        self._torch = torch
        self.device = torch.device(device)
        self.search_backend = search  # "faiss" or "torch" (resolved: see resolve_search)
        self.precision = precision
        self.n_candidates = n_candidates
        self.block_bytes = SEARCH_BLOCK_BYTES
        self._means = torch.zeros((0, dim), dtype=torch.float32, device=self.device)
        self._norms = torch.zeros(0, dtype=torch.float64, device=self.device)
        self._no_means = np.zeros((0, dim), dtype=np.float32)
        # GPU indexes and resources are not thread-safe even for search.
        self._lock = threading.Lock()
        self._resources = None
        if search == "faiss":
            import faiss.contrib.torch_utils  # noqa: F401, PLC0415  (torch tensors in knn_gpu)

            self._resources = faiss.StandardGpuResources()

    def _grow_buffers(self, capacity: int) -> None:
        torch = self._torch
        means = torch.zeros((capacity, self.dim), dtype=torch.float32, device=self.device)
        norms = torch.zeros(capacity, dtype=torch.float64, device=self.device)
        means[: self.size] = self._means[: self.size]
        norms[: self.size] = self._norms[: self.size]
        self._means, self._norms = means, norms

    @property
    def means(self) -> np.ndarray:
        # A copy on every device: .cpu() copies off an accelerator; on the CPU .numpy() would share the live buffer.
        live = self._means[: self.size]
        return live.numpy().copy() if live.device.type == "cpu" else live.cpu().numpy()

    @property
    def counts(self) -> np.ndarray:
        return self._counts[: self.size].copy()

    def rows(self, x: np.ndarray) -> Any:
        return self._torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)

    def _set_means(self, means: np.ndarray) -> None:
        k = means.shape[0]
        self._means[:k] = self._torch.from_numpy(means).to(self.device)
        self._norms[:k] = (self._means[:k].double() ** 2).sum(1)

    def absorb(self, X: Any, weights: np.ndarray, pm2: np.ndarray | None = None, limit: int = NO_LIMIT) -> int:
        with self._lock:
            return super().absorb(X, weights, pm2, limit)

    def _knn(self, queries: Any, k0: int, k: int, precision: str) -> tuple[Any, Any]:
        """Top-k of queries [n, dim] among the first k0 centroids: (squared dists [n, k'], ids [n, k'])."""
        means = self._means[:k0]
        if self._resources is not None:
            out_d, out_i = [], []
            # The torch form of knn_gpu has no memory limit: cut the queries ourselves.
            for lo in range(0, queries.shape[0], 65536):
                d, i = faiss.knn_gpu(self._resources, queries[lo : lo + 65536], means, k)
                out_d.append(d)
                out_i.append(i)
            return self._torch.cat(out_d), self._torch.cat(out_i)
        return torch_knn(queries, means, self._norms[:k0], k, precision, self.block_bytes)

    def _prepare(self, chunk: Any, weights: np.ndarray, pm2: np.ndarray, k0: int) -> tuple[Chunk, Search, Book]:
        torch = self._torch
        b = chunk.shape[0]
        xn = (chunk.double() ** 2).sum(1)
        if k0:
            m = min(self.n_candidates, k0)
            ids = self._knn(chunk, k0, m, self.precision)[1]
            cols, cand = torch.unique(ids, sorted=True, return_inverse=True)
            dist = xn[:, None] + self._norms[cols][None, :]
            dist = (dist - 2.0 * (chunk @ self._means[cols].T).double()).float().cpu().numpy()
            col_norm = self._norms[cols].cpu().numpy()
            cols, cand = cols.cpu().numpy(), cand.cpu().numpy()
        else:
            cols = np.zeros(0, dtype=np.int64)
            cand = np.zeros((b, 0), dtype=np.int64)
            dist = np.zeros((b, 0), dtype=np.float32)
            col_norm = np.zeros(0, dtype=np.float64)
        gram = (chunk @ chunk.T).cpu().numpy()
        ch = Chunk(np.zeros((b, 0), dtype=np.float32), weights, pm2, xn.cpu().numpy(), gram)
        se = Search(dist, cols, col_norm, cand, False, False)
        return ch, se, Book(self._no_means, self._counts, self._m2)

    def _apply(self, rows: Any, weights: np.ndarray, assign: np.ndarray, k_new: int) -> None:
        """Fold assigned rows into their centroids: mu = (n0 mu0 + sum w x) / (n0 + sum w).

        The kernel already updated the host counts, so n1 = counts[id] and
        n0 = n1 - sum w (0 for a centroid created in this chunk).
        """
        if not assign.size:
            return
        torch = self._torch
        uniq, inv = np.unique(assign, return_inverse=True)
        wsum = np.bincount(inv, weights=weights).astype(np.int64)
        n1 = self._counts[uniq]
        n0 = n1 - wsum
        dev = self.device
        ids = torch.from_numpy(uniq).to(dev)
        sums = torch.zeros((uniq.shape[0], self.dim), dtype=torch.float64, device=dev)
        w = torch.from_numpy(weights.astype(np.float64)).to(dev)
        sums.index_add_(0, torch.from_numpy(inv.astype(np.int64)).to(dev), rows.double() * w[:, None])
        n0_t = torch.from_numpy(n0.astype(np.float64)).to(dev)[:, None]
        n1_t = torch.from_numpy(n1.astype(np.float64)).to(dev)[:, None]
        new = (self._means[ids].double() * n0_t + sums) / n1_t
        self._means[ids] = new.float()
        self._norms[ids] = (self._means[ids].double() ** 2).sum(1)

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [n, dim] float32 tensor -> (squared distances float32 [n, k'], ids int64 [n, k']) as numpy.

        In fp16/bf16 the half-precision search proposes max(k, HALF_SEARCH_CANDIDATES)
        candidates per query and they are re-ranked by exact fp32 distances.
        """
        with self._lock:
            if self.precision == "fp32":
                dist, ids = self._knn(queries, self.size, k, "fp32")
            else:
                m = max(int(k), HALF_SEARCH_CANDIDATES)
                cand = self._knn(queries, self.size, m, self.precision)[1]
                dist, ids = rerank_exact(queries, self._means[: self.size], cand, k, self.block_bytes)
            return dist.cpu().numpy(), ids.cpu().numpy().astype(np.int64)
