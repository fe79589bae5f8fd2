"""The method's radius rule: p99 of each normal patch's distance to its nearest other patch.

The exact rule searches every patch against every other (quadratic: 39k patches at
224^2 are ~5 TFLOP, 205k at 512^2 ~130 TFLOP). :func:`estimate_radius` keeps each
distance exact but computes it only for a seeded sample of *query* patches, each
searched against ALL patches, so the cost is linear in the patch count; the
percentile then comes with a distribution-free confidence interval.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy.stats import binom

from ..engine.cpu_search import exact_knn
from ..errors import InputError, InputTypeError

PERCENTILES = (50, 90, 95, 99)
# 8192 queries: the estimate's error, its interval's coverage and its cost against the exact
# rule, per query count, are in benchmarks/results/radius_estimate_cpu.json and
# figures_cpu.json (`python -m benchmarks.bench_pipeline --part radius|figures`; the docs'
# Benchmarks page shows them). The cost is n / 8192 of the exact rule's.
DEFAULT_MAX_QUERIES = 8192
# Database rows per exact search call: bounds the distance block to queries x 32768 floats.
DATABASE_CHUNK_ROWS = 32768


def sample_images(n_images: int, max_images: int, seed: int) -> list[int]:
    """The seeded, sorted choice of up to ``max_images`` of ``n_images`` images for the rule."""
    rng = np.random.default_rng(seed)
    n = min(n_images, max_images)
    return sorted(rng.choice(n_images, size=n, replace=False).tolist())


class RowSource(Protocol):
    """Rows [n, dim] float32 that can be gathered by index and read in order, chunk by chunk.

    A numpy array (or memmap) is wrapped by :class:`ArrayRows`; :class:`ocbank.model.spool.FeatureSpool`
    implements the protocol itself, so a spilled buffer never has to be held whole.
    """

    @property
    def n_rows(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def take(self, indices: np.ndarray) -> np.ndarray: ...

    def iter_chunks(self, rows: int) -> Iterator[np.ndarray]: ...


@dataclass(frozen=True)
class ArrayRows:
    """A :class:`RowSource` over an array [n, dim] (a memmap stays on disk)."""

    array: np.ndarray

    @property
    def n_rows(self) -> int:
        return int(self.array.shape[0])

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def take(self, indices: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.array[indices], dtype=np.float32)

    def iter_chunks(self, rows: int) -> Iterator[np.ndarray]:
        for start in range(0, self.n_rows, rows):
            yield np.ascontiguousarray(self.array[start : start + rows], dtype=np.float32)


def _as_rows(features: Any) -> RowSource:
    if isinstance(features, np.ndarray):
        if features.ndim != 2:
            msg = f"features must be a 2-d array [n, dim], got shape {features.shape!r}. Reshape to (-1, dim)."
            raise InputError(msg)
        if not np.issubdtype(features.dtype, np.floating):
            msg = f"features must be floating point, got dtype {features.dtype!r}. Pass float32 features."
            raise InputTypeError(msg)
        return ArrayRows(features)
    if all(hasattr(features, a) for a in ("n_rows", "dim", "take", "iter_chunks")):
        return features
    msg = f"features must be a float32 array [n, dim] or a FeatureSpool, got {type(features).__name__!r}. Pass one."
    raise InputTypeError(msg)


def _nearest_other_sq(rows: RowSource, query_ids: np.ndarray, search: str = "auto") -> np.ndarray:
    """Squared L2 distance [m] of each query row to its nearest row other than itself (exact).

    The database is read chunk by chunk; per chunk the 2 nearest rows suffice,
    since at most one of them is the query itself (excluded by its index, so an
    exact duplicate elsewhere correctly gives distance 0). ``search`` is ``bank.cpu_search``.
    """
    queries = rows.take(query_ids)
    best = np.full(len(query_ids), np.inf, dtype=np.float32)
    offset = 0
    for chunk in rows.iter_chunks(DATABASE_CHUNK_ROWS):
        if not np.isfinite(chunk).all():
            bad = offset + int(np.flatnonzero(~np.isfinite(chunk).all(axis=1))[0])
            msg = f"features contain NaN or inf values, got one in row {bad}. Check the feature extractor's output."
            raise InputError(msg)
        k = min(2, len(chunk))
        sq, ids = exact_knn(queries, chunk, k, search)
        sq = np.where(ids + offset == query_ids[:, None], np.inf, sq)
        np.minimum(best, sq.min(axis=1), out=best)
        offset += len(chunk)
    return np.maximum(best, 0.0)


def nearest_other_distances(features: np.ndarray) -> np.ndarray:
    """features [n, dim] -> [n] plain L2 distance of each row to its nearest *other* row."""
    rows = _as_rows(features)
    if rows.n_rows < 2:
        msg = f"the radius rule needs at least 2 patches, got {rows.n_rows}. Add training images."
        raise InputError(msg)
    return np.sqrt(_nearest_other_sq(rows, np.arange(rows.n_rows)))


def quantile_interval(m: int, percentile: float, confidence: float) -> tuple[int, int]:
    """1-based order-statistic ranks (lo, hi) with P(X_(lo) <= q_p <= X_(hi)) >= confidence.

    Distribution-free: the number of the m sampled values below the population
    quantile q_p is Binomial(m, p). ``lo`` may be 0 (no lower bound: -inf) and
    ``hi`` may be m + 1 (no upper bound: +inf) when m is too small.
    """
    p = percentile / 100.0
    alpha = 1.0 - confidence
    lo = int(binom.ppf(alpha / 2, m, p))  # the largest l with P(B < l) < alpha/2
    hi = int(binom.ppf(1 - alpha / 2, m, p)) + 1  # the smallest u with P(B >= u) <= alpha/2
    return max(lo, 0), min(hi, m + 1)


@dataclass(frozen=True)
class RadiusEstimate:
    """The radius rule's result: the percentile of nearest-other distances and its confidence interval.

    ``exact`` is True when every patch was a query (the interval then collapses to
    the radius). ``percentiles`` holds p50/p90/p95/p99 of the sampled distances.
    """

    radius: float
    ci_low: float
    ci_high: float
    percentiles: dict[str, float] = field(default_factory=dict)
    n_patches: int = 0
    n_queries: int = 0
    exact: bool = True
    confidence: float = 0.95
    percentile: float = 99.0

    def as_stats(self) -> dict[str, Any]:
        """The dict :func:`radius_statistics` returns (p50..p99, suggested, n_patches) plus the estimate's fields."""
        return {
            **self.percentiles,
            "suggested": self.radius,
            "n_patches": self.n_patches,
            "n_queries": self.n_queries,
            "exact": self.exact,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "confidence": self.confidence,
            "percentile": self.percentile,
        }


    @classmethod
    def from_stats(cls, d: Mapping[str, Any]) -> RadiusEstimate:
        """The estimate back from :meth:`as_stats`'s dict (bank metadata); absent fields take their defaults."""
        radius = float(d["suggested"])
        return cls(
            radius=radius,
            ci_low=float(d.get("ci_low", radius)),
            ci_high=float(d.get("ci_high", radius)),
            percentiles={k: float(v) for k, v in d.items() if re.fullmatch(r"p\d+", k)},
            n_patches=int(d.get("n_patches", 0)),
            n_queries=int(d.get("n_queries", 0)),
            exact=bool(d.get("exact", True)),
            confidence=float(d.get("confidence", 0.95)),
            percentile=float(d.get("percentile", 99.0)),
        )


@dataclass(frozen=True)
class RadiusStats:
    """How a bank's radius was chosen (bank metadata ``radius_stats``): the rule's estimate on
    ``n_images`` images, or the config's number (``estimate`` None)."""

    suggested: float
    estimate: RadiusEstimate | None = None
    n_images: int | None = None  # readable images the estimate was computed on

    @property
    def source(self) -> str:
        return "config" if self.estimate is None else "rule"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the estimate's :meth:`~RadiusEstimate.as_stats` and n_images, or suggested and source."""
        if self.estimate is None:
            return {"suggested": self.suggested, "source": "config"}
        out = self.estimate.as_stats()
        if self.n_images is not None:
            out["n_images"] = self.n_images
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> RadiusStats | None:
        """The record back from :meth:`to_dict` (None for a bank file that has none)."""
        if not d or "suggested" not in d:
            return None
        if d.get("source") == "config":
            return cls(float(d["suggested"]))
        n_images = d.get("n_images")
        return cls(float(d["suggested"]), RadiusEstimate.from_stats(d), None if n_images is None else int(n_images))


def estimate_radius(
    features: np.ndarray | RowSource,
    max_queries: int = DEFAULT_MAX_QUERIES,
    seed: int = 0,
    percentile: float = 99.0,
    confidence: float = 0.95,
    search: str = "auto",
) -> RadiusEstimate:
    """The ``percentile`` of nearest-other-patch distances over features [n, dim], in O(max_queries * n * dim).

    Up to ``max_queries`` query patches are drawn without replacement (seeded);
    each one's nearest-other distance is exact (searched against all n patches).
    With n <= max_queries every patch is a query and the result equals the exact
    rule. ``features`` may also be a :class:`~ocbank.model.spool.FeatureSpool`.
    ``search`` picks the exact search's GEMM (``bank.cpu_search``: auto | faiss | torch | numpy).
    """
    if not (isinstance(max_queries, int) and not isinstance(max_queries, bool) and max_queries >= 2):
        msg = f"max_queries must be an integer >= 2, got {max_queries!r}. Use e.g. {DEFAULT_MAX_QUERIES}."
        raise InputError(msg)
    if not 0.0 < percentile < 100.0:
        msg = f"percentile must lie in (0, 100), got {percentile!r}. Use 99 for the method's rule."
        raise InputError(msg)
    if not 0.0 < confidence < 1.0:
        msg = f"confidence must lie in (0, 1), got {confidence!r}. Use e.g. 0.95."
        raise InputError(msg)
    rows = _as_rows(features)
    n = rows.n_rows
    if n < 2:
        msg = f"the radius rule needs at least 2 patches, got {n}. Add training images."
        raise InputError(msg)
    exact = n <= max_queries
    if exact:
        query_ids = np.arange(n)
    else:
        query_ids = np.sort(np.random.default_rng(seed).choice(n, size=max_queries, replace=False))
    dist = np.sqrt(_nearest_other_sq(rows, query_ids, search).astype(np.float64))
    radius = float(np.percentile(dist, percentile))
    if exact:
        ci_low = ci_high = radius
    else:
        lo, hi = quantile_interval(len(dist), percentile, confidence)
        ordered = np.sort(dist)
        ci_low = float(ordered[lo - 1]) if lo >= 1 else float("-inf")
        ci_high = float(ordered[hi - 1]) if hi <= len(dist) else float("inf")
    return RadiusEstimate(
        radius=radius,
        ci_low=ci_low,
        ci_high=ci_high,
        percentiles={f"p{p}": float(np.percentile(dist, p)) for p in PERCENTILES},
        n_patches=n,
        n_queries=len(query_ids),
        exact=exact,
        confidence=confidence,
        percentile=percentile,
    )


def radius_statistics(features: np.ndarray, max_queries: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Percentiles p50/p90/p95/p99 of nearest-other distances and the suggestion (= p99).

    ``max_queries=None`` is the exact rule (every patch a query); a number gives
    the linear-cost estimate of :func:`estimate_radius` (with its interval in the dict).
    """
    rows = _as_rows(features)
    queries = max(rows.n_rows, 2) if max_queries is None else max_queries
    return estimate_radius(rows, max_queries=queries, seed=seed).as_stats()
