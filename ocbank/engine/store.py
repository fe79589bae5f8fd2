"""Centroid storage and FAISS search for :class:`ocbank.ClusterBank`.

Two stores share one contract: ``add`` streams validated float32 rows through
Algorithm 1, ``search`` answers k-NN queries, and the means/counts they hold
are the single source of truth that every search reads. Neither keeps a copy
of the vectors in a separate index, so the searched structure can never go
stale.

- :class:`CpuStore`: numpy buffers searched with ``faiss.pairwise_distances`` and
  ``faiss.knn`` (faiss-cpu); the kernel updates the means in place (Welford).
- :class:`TorchStore`: torch buffers on a device (CUDA in production), searched
  with ``faiss.knn_gpu``; the kernel decides on the host from small per-chunk
  arrays and the means are updated on the device.
"""

from __future__ import annotations

import threading

import numpy as np

from ._faiss import faiss
from .kernel import resolve_chunk

# Upper bound on floats in one chunk's distance block (b x K): 128 MiB.
_MAX_BLOCK_FLOATS = 1 << 25
_MAX_CHUNK_ROWS = 1024
_MIN_CHUNK_ROWS = 64


def chunk_rows(n_centroids: int) -> int:
    """Rows per kernel call so that the distance block stays bounded."""
    rows = _MAX_BLOCK_FLOATS // max(n_centroids, 1)
    return int(min(_MAX_CHUNK_ROWS, max(_MIN_CHUNK_ROWS, rows)))


def _grown_capacity(current: int, needed: int) -> int:
    capacity = max(current, 256)
    while capacity < needed:
        capacity *= 2
    return capacity


def _sq_norms(rows: np.ndarray) -> np.ndarray:
    """[n, dim] float32 -> [n] float64 squared L2 norms."""
    return np.einsum("ij,ij->i", rows, rows, dtype=np.float64)


class CpuStore:
    """Doubling numpy buffers of means [cap, dim] and counts [cap]."""

    def __init__(self, dim: int, radius: float) -> None:
        self.dim = dim
        self._r2 = float(radius) ** 2
        self.size = 0
        self._means = np.zeros((0, dim), dtype=np.float32)
        self._counts = np.zeros(0, dtype=np.int64)
        self._norms = np.zeros(0, dtype=np.float64)

    def _reserve(self, needed: int) -> None:
        if needed <= self._means.shape[0]:
            return
        capacity = _grown_capacity(self._means.shape[0], needed)
        means = np.zeros((capacity, self.dim), dtype=np.float32)
        counts = np.zeros(capacity, dtype=np.int64)
        norms = np.zeros(capacity, dtype=np.float64)
        means[: self.size] = self._means[: self.size]
        counts[: self.size] = self._counts[: self.size]
        norms[: self.size] = self._norms[: self.size]
        self._means, self._counts, self._norms = means, counts, norms

    @property
    def means(self) -> np.ndarray:
        view = self._means[: self.size]
        view.flags.writeable = False
        return view

    @property
    def counts(self) -> np.ndarray:
        view = self._counts[: self.size]
        view.flags.writeable = False
        return view

    def set_state(self, means: np.ndarray, counts: np.ndarray) -> None:
        self.size = 0
        self._reserve(means.shape[0])
        self._means[: means.shape[0]] = means
        self._counts[: counts.shape[0]] = counts
        self._norms[: means.shape[0]] = _sq_norms(self._means[: means.shape[0]])
        self.size = means.shape[0]

    def add(self, X: np.ndarray, weights: np.ndarray) -> None:
        """Stream rows of X [n, dim] float32 (C-contiguous) with integer weights [n]."""
        start, n = 0, X.shape[0]
        while start < n:
            k0 = self.size
            chunk = X[start : start + chunk_rows(k0)]
            b = chunk.shape[0]
            self._reserve(k0 + b)
            if k0:
                dist = faiss.pairwise_distances(chunk, self._means[:k0])
            else:
                dist = np.zeros((b, 0), dtype=np.float32)
            gram = chunk @ chunk.T
            assign = np.empty(b, dtype=np.int64)
            done, k_new = resolve_chunk(
                chunk,
                weights[start : start + b],
                _sq_norms(chunk),
                dist,
                np.arange(k0, dtype=np.int64),
                self._norms[:k0],
                np.zeros((b, 0), dtype=np.int64),
                True,
                gram,
                self._means,
                self._counts,
                k0,
                self._r2,
                True,
                assign,
            )
            touched = np.unique(assign[:done])
            self._norms[touched] = _sq_norms(self._means[touched])
            self.size = k_new
            start += done

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [n, dim] float32 -> (squared distances [n, k] float32, ids [n, k] int64)."""
        return faiss.knn(queries, self._means[: self.size], k)


class TorchStore:
    """Torch buffers on one device; CUDA searches go through ``faiss.knn_gpu``.

    Per chunk only small arrays cross to the host: the distances to the union of
    the chunk's top-``n_candidates`` centroids [b, u], the candidate lists
    [b, m] and the Gram matrix [b, b]. The host decides, the device updates.
    """

    def __init__(self, dim: int, radius: float, device: str, n_candidates: int = 16) -> None:
        import torch  # noqa: PLC0415

        self._torch = torch
        self.dim = dim
        self._r2 = float(radius) ** 2
        self.size = 0
        self.device = torch.device(device)
        self.n_candidates = n_candidates
        self._means = torch.zeros((0, dim), dtype=torch.float32, device=self.device)
        self._counts = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._norms = torch.zeros(0, dtype=torch.float64, device=self.device)
        self._host_counts = np.zeros(0, dtype=np.int64)
        # GPU indexes and resources are not thread-safe even for search.
        self._lock = threading.Lock()
        self._resources = None
        if self.device.type == "cuda":
            import faiss.contrib.torch_utils  # noqa: F401, PLC0415  (torch tensors in knn_gpu)

            self._resources = faiss.StandardGpuResources()

    def _reserve(self, needed: int) -> None:
        torch = self._torch
        if needed <= self._means.shape[0]:
            return
        capacity = _grown_capacity(self._means.shape[0], needed)
        means = torch.zeros((capacity, self.dim), dtype=torch.float32, device=self.device)
        counts = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        norms = torch.zeros(capacity, dtype=torch.float64, device=self.device)
        host_counts = np.zeros(capacity, dtype=np.int64)
        means[: self.size] = self._means[: self.size]
        counts[: self.size] = self._counts[: self.size]
        norms[: self.size] = self._norms[: self.size]
        host_counts[: self.size] = self._host_counts[: self.size]
        self._means, self._counts, self._norms = means, counts, norms
        self._host_counts = host_counts

    @property
    def means(self) -> np.ndarray:
        return self._means[: self.size].cpu().numpy()

    @property
    def counts(self) -> np.ndarray:
        return self._host_counts[: self.size].copy()

    def set_state(self, means: np.ndarray, counts: np.ndarray) -> None:
        torch = self._torch
        self.size = 0
        self._reserve(means.shape[0])
        k = means.shape[0]
        self._means[:k] = torch.from_numpy(np.ascontiguousarray(means)).to(self.device)
        self._counts[:k] = torch.from_numpy(counts).to(self.device)
        self._norms[:k] = (self._means[:k].double() ** 2).sum(1)
        self._host_counts[:k] = counts
        self.size = k

    def _candidates(self, chunk, k0: int, m: int):
        """Top-m pre-chunk centroids per row: (squared dists [b, m], ids [b, m])."""
        torch = self._torch
        if self._resources is not None:
            return faiss.knn_gpu(self._resources, chunk, self._means[:k0], m)
        full = (chunk.double() ** 2).sum(1, keepdim=True) + self._norms[:k0][None, :]
        full = full - 2.0 * (chunk @ self._means[:k0].T).double()
        dist, ids = torch.topk(full, m, dim=1, largest=False, sorted=True)
        return dist.float(), ids

    def add(self, X, weights: np.ndarray) -> None:
        """Stream rows of X [n, dim] (float32 tensor on this device) with weights [n]."""
        with self._lock:
            self._add_locked(X, weights)

    def _add_locked(self, X, weights: np.ndarray) -> None:
        torch = self._torch
        start, n = 0, X.shape[0]
        no_means = np.zeros((0, self.dim), dtype=np.float32)
        while start < n:
            k0 = self.size
            chunk = X[start : start + chunk_rows(k0)]
            b = chunk.shape[0]
            self._reserve(k0 + b)
            xn = (chunk.double() ** 2).sum(1)
            if k0:
                m = min(self.n_candidates, k0)
                _, ids = self._candidates(chunk, k0, m)
                cols, cand = torch.unique(ids, sorted=True, return_inverse=True)
                dist = xn[:, None] + self._norms[cols][None, :]
                dist = dist - 2.0 * (chunk @ self._means[cols].T).double()
                col_norm = self._norms[cols]
            else:
                cols = torch.zeros(0, dtype=torch.int64, device=self.device)
                cand = torch.zeros((b, 0), dtype=torch.int64, device=self.device)
                dist = torch.zeros((b, 0), dtype=torch.float32, device=self.device)
                col_norm = torch.zeros(0, dtype=torch.float64, device=self.device)
            gram = chunk @ chunk.T
            assign = np.empty(b, dtype=np.int64)
            w = weights[start : start + b]
            done, k_new = resolve_chunk(
                np.zeros((b, 0), dtype=np.float32),
                w,
                xn.cpu().numpy(),
                dist.float().cpu().numpy(),
                cols.cpu().numpy(),
                col_norm.cpu().numpy(),
                cand.cpu().numpy(),
                False,
                gram.cpu().numpy(),
                no_means,
                self._host_counts,
                k0,
                self._r2,
                False,
                assign,
            )
            self._apply(chunk[:done], w[:done], assign[:done])
            self.size = k_new
            start += done

    def _apply(self, rows, weights: np.ndarray, assign: np.ndarray) -> None:
        """Fold assigned rows into their centroids: mu = (n0 mu0 + sum w x) / (n0 + sum w)."""
        torch = self._torch
        ids = torch.from_numpy(assign).to(self.device)
        w = torch.from_numpy(weights).to(self.device)
        uniq, inv = torch.unique(ids, return_inverse=True)
        sums = torch.zeros((uniq.shape[0], self.dim), dtype=torch.float64, device=self.device)
        sums.index_add_(0, inv, rows.double() * w.double()[:, None])
        wsum = torch.zeros(uniq.shape[0], dtype=torch.int64, device=self.device)
        wsum.index_add_(0, inv, w)
        n0 = self._counts[uniq]
        n1 = n0 + wsum
        new = (self._means[uniq].double() * n0.double()[:, None] + sums) / n1.double()[:, None]
        self._means[uniq] = new.float()
        self._counts[uniq] = n1
        self._norms[uniq] = (self._means[uniq].double() ** 2).sum(1)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [n, dim] float32 tensor -> (squared distances, ids) as numpy."""
        torch = self._torch
        with self._lock:
            if self._resources is not None:
                out_d, out_i = [], []
                for lo in range(0, queries.shape[0], 65536):
                    d, i = faiss.knn_gpu(
                        self._resources, queries[lo : lo + 65536], self._means[: self.size], k
                    )
                    out_d.append(d)
                    out_i.append(i)
                dist, ids = torch.cat(out_d), torch.cat(out_i)
            else:
                means = self._means[: self.size]
                full = (queries.double() ** 2).sum(1, keepdim=True) + self._norms[: self.size][None]
                full = full - 2.0 * (queries @ means.T).double()
                kk = min(k, self.size)
                dist, ids = torch.topk(full, kk, dim=1, largest=False, sorted=True)
                dist = dist.float()
            return dist.cpu().numpy(), ids.cpu().numpy().astype(np.int64)
