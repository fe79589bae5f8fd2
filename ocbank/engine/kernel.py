"""The sequential part of Algorithm 1, compiled with numba.

One call resolves a chunk of b vectors whose squared distances to the
*pre-chunk* centroids were computed in one batched FAISS search. Centroids that
earlier vectors of the same chunk moved or created ("touched" centroids) are
handled through dot products: every step j of the chunk is logged as
(slot, weight fraction), and when vector x_i's turn comes the log is replayed on
row i of the Gram matrix ``G = X X^T`` to get ``x_i . mu_t`` for every touched
centroid t. That costs O(i) scalar work on cache-resident rows instead of
O(i * dim), and the whole chunk O(b^2 + b * K).

The result equals feeding the vectors one at a time, up to float rounding on
decisions that are genuinely near a tie. When the means buffer is updated in
place (``apply_inplace``), those near-ties (two nearest centroids, or a distance
near the radius) are re-decided from the exact float64 distance.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Relative band, in units of ||x||^2 + ||mu||^2, inside which a squared distance
# from the GEMM form ||x||^2 + ||mu||^2 - 2 x.mu is not trusted to decide.
NEAR_TIE_REL = 1e-5


@njit(cache=True, nogil=True)
def _collect_below(row: np.ndarray, threshold: float, out: np.ndarray) -> int:
    """Write the positions of entries <= threshold into out; return how many there are.

    A result above ``out.shape[0]`` means out holds only the first ones.
    """
    n = 0
    limit = row.dtype.type(threshold)
    for j in range(row.shape[0]):
        if row[j] <= limit:
            if n < out.shape[0]:
                out[n] = j
            n += 1
    return n


@njit(cache=True, nogil=True)
def _exact_sq_dist(x: np.ndarray, mu: np.ndarray) -> float:
    acc = 0.0
    for j in range(x.shape[0]):
        diff = np.float64(x[j]) - np.float64(mu[j])
        acc += diff * diff
    return acc


@njit(cache=True, nogil=True, fastmath=True)
def _row_min(row: np.ndarray) -> float:
    best = np.inf
    for j in range(row.shape[0]):
        best = min(best, row[j])
    return best


_CREATE = 0
_FIRST_TOUCH = 1
_ABSORB = 2


@njit(cache=True, nogil=True)
def resolve_chunk(
    X: np.ndarray,  # [b, dim] float32 (may be [b, 0] when not apply_inplace)
    weights: np.ndarray,  # [b] int64, 1 for plain vectors
    xn: np.ndarray,  # [b] float64, ||x_i||^2
    D: np.ndarray,  # [b, u] float32 squared distances to the pre-chunk columns (overwritten)
    col_ids: np.ndarray,  # [u] int64 centroid id of each column
    col_norm: np.ndarray,  # [u] float64 ||mu||^2 of each column
    cand: np.ndarray,  # [b, m] int64 column positions, ascending distance, -1 = none
    complete: bool,  # True: D holds every centroid and cand is ignored
    G: np.ndarray,  # [b, b] float32, X X^T
    means: np.ndarray,  # [cap, dim] float32, updated when apply_inplace
    counts: np.ndarray,  # [cap] int64, always updated
    k0: int,  # number of centroids before the chunk
    r2: float,  # squared radius
    apply_inplace: bool,
    assign: np.ndarray,  # [b] int64 out: centroid id of each processed vector
) -> tuple[int, int]:
    """Resolve vectors in order; return (vectors processed, new centroid count).

    Fewer than b vectors are processed only in candidate mode, when vector i's
    candidate list cannot prove which centroid is nearest; vectors before i are
    fully applied and the caller searches again from i.
    """
    b = xn.shape[0]
    n_cols = D.shape[1]
    n_cand = cand.shape[1]
    slot_of = np.full(k0 + b, -1, dtype=np.int64)
    slot_ids = np.empty(b, dtype=np.int64)
    slot_col = np.empty(b, dtype=np.int64)
    slot_norm = np.empty(b, dtype=np.float64)
    step_slot = np.empty(b, dtype=np.int64)
    step_kind = np.empty(b, dtype=np.int64)
    step_frac = np.empty(b, dtype=np.float64)
    dots = np.empty(b, dtype=np.float64)  # x_i . mu_t per touched slot, for the current i
    near = np.empty(64, dtype=np.int64)  # columns within the near-tie band of row i
    n_slots = 0
    k = k0
    for i in range(b):
        # Replay the chunk's steps on row i: dots[s] = x_i . (current mu of slot s).
        for j in range(i):
            s = step_slot[j]
            kind = step_kind[j]
            if kind == _CREATE:
                dots[s] = np.float64(G[i, j])
                continue
            if kind == _FIRST_TOUCH:
                c = slot_col[s]
                dots[s] = 0.5 * (xn[i] + col_norm[c] - np.float64(D[i, c]))
            dots[s] += step_frac[j] * (np.float64(G[i, j]) - dots[s])
        if complete:
            # Touched columns are stale for this row; the slots above replace them.
            for s in range(n_slots):
                if slot_col[s] >= 0:
                    D[i, slot_col[s]] = np.inf

        best_d = np.inf
        best_id = -1
        best_col = -1
        second_d = np.inf
        second_id = -1
        second_col = -1
        for s in range(n_slots):
            d = xn[i] + slot_norm[s] - 2.0 * dots[s]
            cid = slot_ids[s]
            if d < best_d or (d == best_d and cid < best_id):
                second_d, second_id, second_col = best_d, best_id, best_col
                best_d, best_id, best_col = d, cid, -1
            elif d < second_d or (d == second_d and cid < second_id):
                second_d, second_id, second_col = d, cid, -1

        # Untouched centroids: the chunk's search is still exact for them.
        if complete:
            n_scan = 0
            if n_cols:
                # A vectorised min, then only the entries that can be the best or
                # a near-tie second go through the exact comparison below.
                row_best = min(best_d, np.float64(_row_min(D[i])))
                threshold = row_best + NEAR_TIE_REL * 2.0 * (xn[i] + max(row_best, 0.0))
                # Rounding up keeps every entry within the band in float32.
                n_scan = _collect_below(D[i], threshold * (1.0 + 1e-6), near)
        else:
            n_scan = n_cand
        # Many exact ties (more than `near` holds): compare the whole row.
        scan_all = complete and n_scan > near.shape[0]
        if scan_all:
            n_scan = n_cols
        untouched_seen = False
        lower_bound = -np.inf
        for j in range(n_scan):
            if scan_all:
                c = j
            elif complete:
                c = near[j]
            else:
                c = cand[i, j]
            if c < 0:
                break
            d = np.float64(D[i, c])
            if d > lower_bound:
                lower_bound = d
            cid = col_ids[c]
            if not complete and slot_of[cid] >= 0:
                continue
            untouched_seen = True
            if d < best_d or (d == best_d and cid < best_id):
                second_d, second_id, second_col = best_d, best_id, best_col
                best_d, best_id, best_col = d, cid, c
            elif d < second_d or (d == second_d and cid < second_id):
                second_d, second_id, second_col = d, cid, c
        if not complete and not untouched_seen and k0 > n_cand and best_d >= lower_bound:
            # Every candidate was touched: an untouched centroid outside the list
            # may be nearer than the best touched one. Search again from here.
            return i, k

        if best_id >= 0 and apply_inplace:
            # ||mu||^2 <= 2 ||x||^2 + 2 d bounds the magnitude of the GEMM terms.
            tol = NEAR_TIE_REL * 2.0 * (xn[i] + max(best_d, 0.0))
            if second_id >= 0 and second_d - best_d <= tol:
                d1 = _exact_sq_dist(X[i], means[best_id])
                d2 = _exact_sq_dist(X[i], means[second_id])
                if d2 < d1 or (d2 == d1 and second_id < best_id):
                    best_d, best_id, best_col = d2, second_id, second_col
                else:
                    best_d = d1
            elif abs(best_d - r2) <= tol:
                best_d = _exact_sq_dist(X[i], means[best_id])

        w = weights[i]
        if best_id >= 0 and best_d <= r2:
            cid = best_id
            s = slot_of[cid]
            if s < 0:
                s = n_slots
                n_slots += 1
                slot_of[cid] = s
                slot_ids[s] = cid
                slot_col[s] = best_col
                slot_norm[s] = col_norm[best_col]
                dots[s] = 0.5 * (xn[i] + col_norm[best_col] - np.float64(D[i, best_col]))
                step_kind[i] = _FIRST_TOUCH
            else:
                step_kind[i] = _ABSORB
            n = counts[cid] + w
            counts[cid] = n
            frac = w / n
            old_norm = slot_norm[s]
            slot_norm[s] = old_norm + 2.0 * frac * (dots[s] - old_norm) + frac * frac * max(best_d, 0.0)
            if apply_inplace:
                row = means[cid]
                xi = X[i]
                for j in range(row.shape[0]):
                    mu = np.float64(row[j])
                    row[j] = mu + frac * (np.float64(xi[j]) - mu)
        else:
            cid = k
            k += 1
            counts[cid] = w
            frac = 1.0
            s = n_slots
            n_slots += 1
            slot_of[cid] = s
            slot_ids[s] = cid
            slot_col[s] = -1
            slot_norm[s] = xn[i]
            step_kind[i] = _CREATE
            if apply_inplace:
                means[cid, :] = X[i]
        step_slot[i] = s
        step_frac[i] = frac
        assign[i] = cid
    return b, k
