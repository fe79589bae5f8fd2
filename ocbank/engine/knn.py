"""Exact k-NN on a buffer of centroids, on whichever GEMM is fastest here, with exact distances.

The ranking may run on faiss (``faiss.knn``), torch (:func:`torch_knn`: a GEMM plus
``topk``, on any device) or numpy (:func:`numpy_knn`, on numpy's BLAS); the neighbours it
returns then get exact fp32 distances in one place (:func:`rerank_exact`, through
:func:`cpu_knn` on the CPU), because each BLAS rounds the GEMM form differently. The stores
(:mod:`ocbank.engine.store`) search through these functions; :mod:`ocbank.engine.cpu_search`
picks the CPU's GEMM.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError
from ._faiss import faiss

# How a bank searches, one vocabulary for both devices (the CPU adds numpy's GEMM). ``bank.gpu_search``
# (a CUDA bank): "faiss" (faiss.knn_gpu, needs a faiss GPU build), "torch" (GEMM + topk in torch),
# or "auto" (faiss when its GPU build is present and the precision is fp32, else torch).
# ``bank.cpu_search`` (a CPU bank's exact searches): "faiss" (faiss.knn and
# faiss.pairwise_distances, on the BLAS inside the faiss wheel), "torch" (the same products on
# torch's BLAS), "numpy" (on numpy's BLAS), or "auto" (the fastest on this machine: see cpu_search.py).
SEARCHES = ("auto", "faiss", "torch")
CPU_SEARCHES = (*SEARCHES, "numpy")
# The concrete CPU searches "auto" resolves to, as ``ClusterBank.search_backend["search"]`` records them.
CPU_SEARCH_BACKENDS = ("faiss", "torch", "numpy")
# Precision of the torch search's candidate GEMM; fp16/bf16 candidates are re-checked in fp32.
SEARCH_PRECISIONS = ("fp32", "fp16", "bf16")
# Upper bound, in bytes, on one distance block [query rows, centroid columns] of the torch and
# numpy searches (:func:`block_shape`): queries (and, past 64M centroids, centroids) are cut into
# blocks below it. 256 MiB keeps the scratch a small share of any GPU's memory while a block still holds hundreds of
# query rows against a large bank, tall enough for the GEMM to run at full rate.
SEARCH_BLOCK_BYTES = 256 << 20
# Candidates per query of a half-precision search before the exact fp32 re-ranking.
HALF_SEARCH_CANDIDATES = 16


def block_shape(n: int, big_k: int, k: int, itemsize: int, block_bytes: int = SEARCH_BLOCK_BYTES) -> tuple[int, int]:
    """(rows, cols) of one distance block of a k-NN of n queries among big_k centroids, at most ``block_bytes``.

    Every centroid column in one block when they fit (else ``block_bytes / itemsize`` of them, never
    fewer than k), then as many query rows as fit beside them (at least one).
    """
    cols = max(k, min(big_k, block_bytes // itemsize))
    rows = max(1, min(n, block_bytes // (itemsize * cols)))
    return rows, cols


def sq_norms(rows: np.ndarray) -> np.ndarray:
    """[n, dim] float32 -> [n] float64 squared L2 norms."""
    return np.einsum("ij,ij->i", rows, rows, dtype=np.float64)


def torch_view(torch: Any, arr: np.ndarray) -> Any:
    """A CPU tensor sharing ``arr``'s memory (a copy only of a read-only array, which torch cannot wrap)."""
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _torch_dtype(torch: Any, precision: str) -> Any:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def torch_knn(
    queries: Any,
    means: Any,
    norms: Any,
    k: int,
    precision: str = "fp32",
    block_bytes: int = SEARCH_BLOCK_BYTES,
    query_norms: Any = None,
) -> tuple[Any, Any]:
    """k nearest centroids by GEMM + ``topk``: (squared L2 float32 [n, k'], ids int64 [n, k']), k' = min(k, K).

    queries [n, dim] float32 and means [K, dim] float32 on one device, norms [K] = ||mu||^2,
    ``query_norms`` [n] = ||q||^2 when the caller has them (else computed here, in float64).
    The ranking key ||mu||^2 - 2 q mu^T is formed in ``precision`` one block [rows, cols] at a
    time (:func:`block_shape`); blocks of centroid columns merge their top-k. ||q||^2 is the same along a row,
    so it is added (and the result clamped >= 0) to the k selected entries only: the same
    ||q||^2 - 2 q mu^T + ||mu||^2 values as adding it to the whole block, without two passes
    over it. For k = 1 the selection is a row minimum (ties: the lowest id).
    fp16/bf16 inputs are scaled by the largest norm first, so no dot product overflows
    fp16's range; the distances are then approximate (use them as candidates).
    """
    import torch  # noqa: PLC0415
    n, big_k = queries.shape[0], means.shape[0]
    kk = min(int(k), big_k)
    dtype = _torch_dtype(torch, precision)
    rows, cols = block_shape(n, big_k, kk, torch.finfo(dtype).bits // 8, block_bytes)
    qn = (queries.double() ** 2).sum(1) if query_norms is None else query_norms.double()
    mn = norms.double()
    scale = 1.0
    if precision != "fp32" and n and big_k:
        # |q . mu| <= ||q|| ||mu|| <= scale^2: every term of the block stays <= 1 (fp16 tops out at 65504).
        scale = float(max(qn.max().item(), mn.max().item(), 1e-30)) ** 0.5
    q, m = (queries, means) if precision == "fp32" else ((queries / scale).to(dtype), (means / scale).to(dtype))
    qn = (qn / scale**2).to(dtype)
    mn = (mn / scale**2).to(dtype)
    out_d = torch.empty((n, kk), dtype=torch.float32, device=queries.device)
    out_i = torch.empty((n, kk), dtype=torch.int64, device=queries.device)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        best_d = best_i = None
        for c0 in range(0, big_k, cols):
            c1 = min(big_k, c0 + cols)
            block = torch.addmm(mn[None, c0:c1], q[lo:hi], m[c0:c1].T, beta=1, alpha=-2)
            if kk == 1:
                d, i = block.min(dim=1, keepdim=True)
            else:
                d, i = torch.topk(block, min(kk, c1 - c0), dim=1, largest=False, sorted=True)
            del block
            i += c0
            if best_d is not None:
                d, i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
                d, pos = torch.topk(d, kk, dim=1, largest=False, sorted=True)
                i = torch.gather(i, 1, pos)
            best_d, best_i = d, i
        best_d += qn[lo:hi, None]
        out_d[lo:hi] = best_d.clamp_(min=0).float() * scale**2
        out_i[lo:hi] = best_i
    return out_d, out_i


def _smallest(key: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest entries of each row of key [r, c], ascending: (values [r, k], column positions int64 [r, k]).

    k = 1 is a row's argmin (ties: the lowest position); else argpartition, then a sort of the k.
    """
    if k == 1:
        pos = key.argmin(axis=1)[:, None]
    elif k >= key.shape[1]:
        pos = np.argsort(key, axis=1, kind="stable")
    else:
        pos = np.argpartition(key, k - 1, axis=1)[:, :k]
        pos = np.take_along_axis(pos, np.argsort(np.take_along_axis(key, pos, 1), axis=1, kind="stable"), 1)
    return np.take_along_axis(key, pos, 1), pos.astype(np.int64, copy=False)


def numpy_knn(
    queries: np.ndarray,
    means: np.ndarray,
    norms: np.ndarray,
    k: int,
    block_bytes: int = SEARCH_BLOCK_BYTES,
) -> np.ndarray:
    """Ids int64 [n, k'] of the k nearest centroids ranked on numpy's GEMM, nearest first; k' = min(k, K).

    queries [n, dim] and means [K, dim] float32, norms [K] = ||mu||^2. The ranking key
    ||mu||^2 - 2 q mu^T (fp32, the fp32 form of :func:`torch_knn`) is formed by ``np.matmul``
    into one block [rows, cols] at a time (:func:`block_shape`), the block's buffer allocated
    once per call; blocks of centroid columns merge their top-k. Only ids come back: the key's
    rounding is the BLAS's, so distances are :func:`rerank_exact`'s (:func:`cpu_knn`).
    """
    n, big_k = queries.shape[0], means.shape[0]
    kk = min(int(k), big_k)
    rows, cols = block_shape(n, big_k, kk, 4, block_bytes)
    buffer = np.empty(min(rows, n) * min(cols, big_k), dtype=np.float32)
    q2 = queries * np.float32(-2)  # exact: the GEMM then gives -2 q mu^T without another pass over the block
    mn = norms.astype(np.float32)
    out = np.empty((n, kk), dtype=np.int64)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        best_d = best_i = None
        for c0 in range(0, big_k, cols):
            c1 = min(big_k, c0 + cols)
            block = buffer[: (hi - lo) * (c1 - c0)].reshape(hi - lo, c1 - c0)
            np.matmul(q2[lo:hi], means[c0:c1].T, out=block)
            block += mn[c0:c1]
            d, i = _smallest(block, min(kk, c1 - c0))
            i += c0
            if best_d is not None:
                d, pos = _smallest(np.concatenate([best_d, d], 1), kk)
                i = np.take_along_axis(np.concatenate([best_i, i], 1), pos, 1)
            best_d, best_i = d, i
        out[lo:hi] = best_i
    return out


def rerank_exact(queries: Any, means: Any, cand: Any, k: int, block_bytes: int = SEARCH_BLOCK_BYTES) -> tuple[Any, Any]:
    """Re-rank candidate ids [n, m] by exact fp32 squared distances ||q - mu||^2: ([n, k'], [n, k']), k' = min(k, m)."""
    import torch  # noqa: PLC0415

    n, m = cand.shape
    kk = min(int(k), m)
    out_d = torch.empty((n, kk), dtype=torch.float32, device=queries.device)
    out_i = torch.empty((n, kk), dtype=torch.int64, device=queries.device)
    rows = max(1, block_bytes // max(1, 4 * m * queries.shape[1]))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        diff = queries[lo:hi, None, :] - means[cand[lo:hi]]  # [rows, m, dim]
        d = (diff * diff).sum(2)
        del diff
        d, pos = torch.topk(d, kk, dim=1, largest=False, sorted=True)
        out_d[lo:hi] = d
        out_i[lo:hi] = torch.gather(cand[lo:hi], 1, pos)
    return out_d, out_i


def cpu_knn(
    queries: np.ndarray, base: np.ndarray, k: int, search: str, norms: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of queries [n, dim] among base rows [m, dim] (float32 numpy) on the CPU.

    ``search`` ("faiss" | "torch" | "numpy") names whose GEMM ranks: ``faiss.knn``,
    :func:`torch_knn` or :func:`numpy_knn` (``norms`` [m] = ||mu||^2 in float64 when the caller
    keeps them). The neighbours any returns then get exact fp32 distances ||q - mu||^2, re-sorted
    (:func:`rerank_exact`), in this one place: the GEMM form's rounding differs between the BLASes
    (and with a row's place in the batch), so a result (a radius, a score) must not take its
    distances from it.
    Returns (squared L2 float32 [n, k'], ids int64 [n, k']), k' = min(k, m).
    """
    import torch  # noqa: PLC0415

    if search not in CPU_SEARCH_BACKENDS:
        msg = f"a CPU search is one of {CPU_SEARCH_BACKENDS}, got {search!r}. Resolve 'auto' first."
        raise InputError(msg)
    kk = min(int(k), base.shape[0])
    if kk <= 0:
        return np.zeros((queries.shape[0], 0), dtype=np.float32), np.zeros((queries.shape[0], 0), dtype=np.int64)
    q, b = torch_view(torch, queries), torch_view(torch, base)
    base_norms = None if search == "faiss" else sq_norms(base) if norms is None else norms
    if search == "faiss":
        ids = torch.from_numpy(faiss.knn(queries, base, kk)[1])
    elif search == "torch":
        ids = torch_knn(q, b, torch.from_numpy(base_norms), kk)[1]
    else:
        ids = torch.from_numpy(numpy_knn(queries, base, base_norms, kk))
    dist, ids = rerank_exact(q, b, ids, kk)
    return dist.numpy(), ids.numpy()
