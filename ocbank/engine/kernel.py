"""The sequential part of Algorithm 1, compiled with numba.

One call of :func:`resolve_chunk` resolves a chunk of b vectors whose squared
distances to the *pre-chunk* centroids were computed in one batched FAISS
search. Centroids that earlier vectors of the same chunk moved or created
("touched" centroids) are handled through dot products: every step j of the
chunk is logged as (slot, weight fraction), and when vector x_i's turn comes the
log is replayed on row i of the Gram matrix ``G = X X^T`` to get ``x_i . mu_t``
for every touched centroid t. That costs O(i) scalar work on cache-resident
rows instead of O(i * dim), and the whole chunk O(b^2 + b * K).

The result equals feeding the vectors one at a time, up to float rounding on
decisions that are genuinely near a tie. When the means buffer is updated in
place (``Search.inplace``), those near-ties (two nearest centroids, or a distance
near the radius) are re-decided from the exact float64 distance.

Inputs are grouped in three small structs (namedtuples of arrays, which numba
compiles as records): :class:`Chunk` (the vectors), :class:`Search` (what the
batched search found) and :class:`Book` (the bank's host-side bookkeeping:
counts, Welford second moments, and the means when they are updated in place).
:func:`resolve_chunk` unpacks them once; the steps (``_replay``, ``_nearest``,
``_refine``, ``_move_mean``) are jitted helpers over plain arrays.

The kernel keeps each centroid's Welford second moment ``M2 = sum ||x - mu||^2``
(weighted): absorbing a point x of weight w carrying its own second moment
``pm2`` (0 for a plain vector, a centroid's M2 when banks are merged) into
(n, mu, M2) gives ``M2 += pm2 + w n / (n + w) ||x - mu||^2``. In place the
distance is the exact float64 one, computed in the same loop that moves the
mean; otherwise it is the chunk's float64 dot-product distance.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

# Relative band, in units of ||x||^2 + ||mu||^2, inside which a squared distance
# from the GEMM form ||x||^2 + ||mu||^2 - 2 x.mu is not trusted to decide.
NEAR_TIE_REL = 1e-5

# Why resolve_chunk stopped before the end of the chunk.
DONE = 0  # every vector was resolved
RESEARCH = 1  # candidate mode: vector i's candidates cannot prove its nearest centroid
FULL = 2  # vector i needs a new centroid and the bank holds ``limit`` already

_CREATE = 0
_FIRST_TOUCH = 1
_ABSORB = 2


class Chunk(NamedTuple):
    """The b vectors of one chunk."""

    X: np.ndarray  # [b, dim] float32; [b, 0] when means are not updated in place
    weights: np.ndarray  # [b] int64, 1 for plain vectors, a count for merged centroids
    pm2: np.ndarray  # [b] float64, second moment each point carries (0 for plain vectors)
    xn: np.ndarray  # [b] float64, ||x_i||^2
    G: np.ndarray  # [b, b] float32, X X^T


class Search(NamedTuple):
    """The chunk's batched search against the pre-chunk centroids."""

    D: np.ndarray  # [b, u] float32 squared distances to the columns (overwritten)
    col_ids: np.ndarray  # [u] int64 centroid id of each column
    col_norm: np.ndarray  # [u] float64 ||mu||^2 of each column
    cand: np.ndarray  # [b, m] int64 column positions by ascending distance, -1 = none
    complete: bool  # True: D holds every centroid and cand is ignored
    inplace: bool  # True: Book.means is the real buffer, updated here


class Book(NamedTuple):
    """Host-side bookkeeping the kernel updates."""

    means: np.ndarray  # [cap, dim] float32 when Search.inplace, else [0, dim]
    counts: np.ndarray  # [cap] int64
    m2: np.ndarray  # [cap] float64


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


# The steps below take plain arrays, not the structs: numba then keeps the data
# pointers of the hot loops in registers (passing the structs down was markedly
# slower). The per-chunk scratch ("the log"): slot_of [k0 + b] (slot
# of a centroid id or -1); per slot: slot_ids, slot_col (its column in the
# search, -1 if created in the chunk), slot_norm (||mu||^2 now), dots (x_i . mu
# for the current row i); per step: step_slot, step_kind, step_frac (w / n).


@njit(cache=True, nogil=True)
def _replay(i, G, xn, D, col_norm, slot_col, step_slot, step_kind, step_frac, dots) -> None:
    """dots[s] = x_i . (current mu of slot s), by replaying steps 0..i-1 on row i of G."""
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


@njit(cache=True, nogil=True)
def _nearest(i, n_slots, k0, xn, D, col_ids, cand, complete, slot_of, slot_ids, slot_col, slot_norm, dots, near):
    """Best and second-best centroid of row i: (found, best_d, best_id, best_col, second_d, second_id, second_col).

    ``found`` is False only in candidate mode when the candidate list cannot prove
    the nearest centroid (every candidate was touched): search again from row i.
    """
    if complete:
        # Touched columns are stale for this row; the slots replace them.
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
    n_cols = D.shape[1]
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
        n_scan = cand.shape[1]
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
    # Every candidate was touched: an untouched centroid outside the list may be
    # nearer than the best touched one.
    found = complete or untouched_seen or k0 <= cand.shape[1] or best_d < lower_bound
    return found, best_d, best_id, best_col, second_d, second_id, second_col


@njit(cache=True, nogil=True)
def _refine(x, xn_i, means, r2, best_d, best_id, best_col, second_d, second_id, second_col):
    """Re-decide a near-tie from exact float64 distances (in-place mode only): (best_d, best_id, best_col)."""
    # ||mu||^2 <= 2 ||x||^2 + 2 d bounds the magnitude of the GEMM terms.
    tol = NEAR_TIE_REL * 2.0 * (xn_i + max(best_d, 0.0))
    if second_id >= 0 and second_d - best_d <= tol:
        d1 = _exact_sq_dist(x, means[best_id])
        d2 = _exact_sq_dist(x, means[second_id])
        if d2 < d1 or (d2 == d1 and second_id < best_id):
            return d2, second_id, second_col
        return d1, best_id, best_col
    if abs(best_d - r2) <= tol:
        return _exact_sq_dist(x, means[best_id]), best_id, best_col
    return best_d, best_id, best_col


@njit(cache=True, nogil=True)
def _move_mean(row, x, frac) -> float:
    """mu += frac (x - mu) in place; return the exact float64 ||x - mu_old||^2 (free in the same loop)."""
    acc = 0.0
    for j in range(row.shape[0]):
        mu = np.float64(row[j])
        diff = np.float64(x[j]) - mu
        acc += diff * diff
        row[j] = mu + frac * diff
    return acc


@njit(cache=True, nogil=True)
def resolve_chunk(ch: Chunk, se: Search, book: Book, k0: int, r2: float, limit: int,
                  assign: np.ndarray) -> tuple[int, int, int]:
    """Resolve the chunk's vectors in order; return (vectors processed, centroid count, why it stopped).

    ``k0`` is the centroid count before the chunk, ``r2`` the squared radius,
    ``limit`` the most centroids the bank may hold, ``assign`` [b] int64 receives
    the centroid id of each processed vector. Vectors before the stopping one are
    fully applied; the reason is :data:`DONE`, :data:`RESEARCH` (candidate lists
    too short: search again from there) or :data:`FULL` (the next vector needs a
    centroid beyond ``limit``).
    """
    X, weights, pm2, xn, G = ch
    D, col_ids, col_norm, cand, complete, inplace = se
    means, counts, m2 = book
    b = xn.shape[0]
    slot_of = np.full(k0 + b, -1, dtype=np.int64)
    slot_ids = np.empty(b, dtype=np.int64)
    slot_col = np.empty(b, dtype=np.int64)
    slot_norm = np.empty(b, dtype=np.float64)
    step_slot = np.empty(b, dtype=np.int64)
    step_kind = np.empty(b, dtype=np.int64)
    step_frac = np.empty(b, dtype=np.float64)
    dots = np.empty(b, dtype=np.float64)
    near = np.empty(64, dtype=np.int64)  # columns within the near-tie band of row i
    n_slots = 0
    k = k0
    for i in range(b):
        _replay(i, G, xn, D, col_norm, slot_col, step_slot, step_kind, step_frac, dots)
        found, best_d, best_id, best_col, second_d, second_id, second_col = _nearest(
            i, n_slots, k0, xn, D, col_ids, cand, complete, slot_of, slot_ids, slot_col, slot_norm, dots, near
        )
        if not found:
            return i, k, RESEARCH
        if best_id >= 0 and inplace:
            best_d, best_id, best_col = _refine(
                X[i], xn[i], means, r2, best_d, best_id, best_col, second_d, second_id, second_col
            )
        w = weights[i]
        if best_id >= 0 and best_d <= r2:
            # Absorb: Welford update of count, mean (in place) and M2.
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
            n_old = counts[cid]
            n = n_old + w
            counts[cid] = n
            frac = w / n
            sq = max(best_d, 0.0)
            old_norm = slot_norm[s]
            slot_norm[s] = old_norm + 2.0 * frac * (dots[s] - old_norm) + frac * frac * sq
            if inplace:
                sq = _move_mean(means[cid], X[i], frac)
            m2[cid] += pm2[i] + (np.float64(n_old) * w / n) * sq
        else:
            if k >= limit:
                return i, k, FULL
            # Create: x becomes centroid k with its weight and carried M2.
            cid = k
            k += 1
            counts[cid] = w
            m2[cid] = pm2[i]
            if inplace:
                means[cid, :] = X[i]
            frac = 1.0
            s = n_slots
            n_slots += 1
            slot_of[cid] = s
            slot_ids[s] = cid
            slot_col[s] = -1
            slot_norm[s] = xn[i]
            step_kind[i] = _CREATE
        step_slot[i] = s
        step_frac[i] = frac
        assign[i] = cid
    return b, k, DONE
