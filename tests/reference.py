"""An independent, plain, one-vector-at-a-time float64 Algorithm 1 (test oracle)."""

from __future__ import annotations

import numpy as np


def reference_stream(
    X: np.ndarray, radius: float, weights: np.ndarray | None = None,
    means: np.ndarray | None = None, counts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (means [K, dim] float64, counts [K] int64) after streaming X's rows in order."""
    M = [] if means is None else [np.asarray(m, dtype=np.float64) for m in means]
    C = [] if counts is None else [int(c) for c in counts]
    X = np.asarray(X, dtype=np.float64)
    w_all = np.ones(len(X), dtype=np.int64) if weights is None else weights
    for x, w in zip(X, w_all):
        if M:
            dist = np.sqrt(((np.array(M) - x) ** 2).sum(axis=1))
            k = int(np.argmin(dist))  # argmin returns the lowest index on ties
            if dist[k] <= radius:
                C[k] += int(w)
                M[k] = M[k] + w * (x - M[k]) / C[k]
                continue
        M.append(x.copy())
        C.append(int(w))
    dim = X.shape[1]
    return np.array(M, dtype=np.float64).reshape(-1, dim), np.array(C, dtype=np.int64)
