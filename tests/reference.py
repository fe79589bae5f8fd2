"""An independent, plain, one-vector-at-a-time float64 Algorithm 1 (test oracle).

It tracks each centroid's second moment M2 = sum_members ||x - mu||^2 with
Welford's weighted update, and optionally the centroid cap (raise the radius,
re-cluster the centroids as weighted points, retry the same vector).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RefBank:
    """Plain Python lists; mirrors ClusterBank's (means, counts, m2, radius, radius_history_)."""

    dim: int
    radius: float
    max_centroids: int | None = None
    growth: float = 1.25
    M: list = field(default_factory=list)
    C: list = field(default_factory=list)
    S: list = field(default_factory=list)  # M2 per centroid
    n_seen: int = 0
    history: list = field(default_factory=list)

    def push(self, x: np.ndarray, w: int = 1, m2: float = 0.0) -> None:
        """Stream one point x of weight w carrying second moment m2."""
        while True:
            if self.M:
                dist = np.sqrt(((np.array(self.M) - x) ** 2).sum(axis=1))
                k = int(np.argmin(dist))  # argmin returns the lowest index on ties
                if dist[k] <= self.radius:
                    n = self.C[k]
                    d2 = float(((x - self.M[k]) ** 2).sum())
                    self.S[k] += m2 + n * w / (n + w) * d2
                    self.C[k] = n + w
                    self.M[k] = self.M[k] + w * (x - self.M[k]) / (n + w)
                    return
            if self.max_centroids is None or len(self.M) < self.max_centroids:
                self.M.append(np.array(x, dtype=np.float64))
                self.C.append(int(w))
                self.S.append(float(m2))
                return
            self.coarsen()

    def coarsen(self) -> None:
        while True:
            old, k_before = self.radius, len(self.M)
            M, C, S = self.M, self.C, self.S
            self.radius = old * self.growth
            self.M, self.C, self.S = [], [], []
            cap, self.max_centroids = self.max_centroids, None
            for mu, c, s in zip(M, C, S, strict=True):
                self.push(mu, c, s)
            self.max_centroids = cap
            self.history.append(
                {"n_seen": self.n_seen, "old": old, "new": self.radius, "k_before": k_before, "k_after": len(self.M)}
            )
            if len(self.M) < cap:
                return

    def stream(self, X: np.ndarray, weights=None, m2=None) -> RefBank:
        X = np.asarray(X, dtype=np.float64)
        w_all = np.ones(len(X), dtype=np.int64) if weights is None else np.asarray(weights)
        m2_all = np.zeros(len(X)) if m2 is None else np.asarray(m2, dtype=np.float64)
        for x, w, s in zip(X, w_all, m2_all, strict=True):
            self.push(x, int(w), float(s))
            self.n_seen += int(w)
        return self

    @property
    def means(self) -> np.ndarray:
        return np.array(self.M, dtype=np.float64).reshape(-1, self.dim)

    @property
    def counts(self) -> np.ndarray:
        return np.array(self.C, dtype=np.int64)

    @property
    def m2(self) -> np.ndarray:
        return np.array(self.S, dtype=np.float64)


def reference_stream(
    X: np.ndarray, radius: float, weights: np.ndarray | None = None,
    means: np.ndarray | None = None, counts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (means [K, dim] float64, counts [K] int64) after streaming X's rows in order."""
    ref = reference_bank(X, radius, weights=weights, means=means, counts=counts)
    return ref.means, ref.counts


def reference_bank(
    X: np.ndarray, radius: float, weights: np.ndarray | None = None, pm2: np.ndarray | None = None,
    means: np.ndarray | None = None, counts: np.ndarray | None = None, m2: np.ndarray | None = None,
    max_centroids: int | None = None, growth: float = 1.25,
) -> RefBank:
    """The reference bank after streaming X's rows (weights, carried M2) into an optional starting bank."""
    dim = np.asarray(X).shape[1]
    ref = RefBank(dim, float(radius), max_centroids, growth)
    if means is not None:
        ref.M = [np.asarray(m, dtype=np.float64) for m in means]
        ref.C = [int(c) for c in counts]
        ref.S = [0.0] * len(ref.M) if m2 is None else [float(s) for s in m2]
        ref.n_seen = int(sum(ref.C))
    return ref.stream(X, weights, pm2)
