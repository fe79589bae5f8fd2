"""The method's radius rule: p99 of each normal patch's distance to its nearest other patch."""

from __future__ import annotations

import numpy as np

from ..engine._faiss import faiss

PERCENTILES = (50, 90, 95, 99)


def sample_images(n_images: int, max_images: int, seed: int) -> list[int]:
    """The seeded, sorted choice of up to ``max_images`` of ``n_images`` images for the rule."""
    rng = np.random.default_rng(seed)
    n = min(n_images, max_images)
    return sorted(rng.choice(n_images, size=n, replace=False).tolist())


def nearest_other_distances(features: np.ndarray) -> np.ndarray:
    """features [n, dim] -> [n] plain L2 distance of each row to its nearest *other* row."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.shape[0] < 2:
        msg = f"the radius rule needs at least 2 patches, got {x.shape[0]}. Add training images."
        raise ValueError(msg)
    sq, ids = faiss.knn(x, x, 2)
    own = ids == np.arange(x.shape[0])[:, None]
    # The row itself is usually first; with exact duplicates it may be second.
    other = np.where(own[:, 0], sq[:, 1], sq[:, 0])
    return np.sqrt(np.maximum(other, 0.0))


def radius_statistics(features: np.ndarray) -> dict[str, float]:
    """Percentiles p50/p90/p95/p99 of nearest-other distances and the suggestion (= p99)."""
    dist = nearest_other_distances(features)
    stats = {f"p{p}": float(np.percentile(dist, p)) for p in PERCENTILES}
    stats["suggested"] = stats["p99"]
    stats["n_patches"] = int(dist.size)
    return stats
