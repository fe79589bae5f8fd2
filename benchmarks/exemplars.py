"""Edge exemplars (research only): keep, raw, the training patches that sit farthest from their own
centroid (the members a centroid represents worst) and score with the smaller of the distance to
the nearest centroid and to the nearest exemplar. Measured by benchmarks/run.py ``--exemplars``.
"""

from __future__ import annotations

import numpy as np

from ocbank.errors import ConfigError, InputError


def edge_exemplars(residuals: np.ndarray, fraction: float) -> np.ndarray:
    """Indices [E] of the training patches farthest from their nearest centroid: the top ``fraction``.

    residuals: [n] each training patch's distance to its nearest centroid (``bank.search(x)[0][:, 0]``
    after the build). E = min(ceil(fraction * n), number of residuals > 0): patches at distance 0
    (e.g. singleton centroids) are never kept. Ties go to the lower index; the result is sorted.
    """
    residuals = np.asarray(residuals, dtype=np.float64)
    if residuals.ndim != 1 or not np.all(np.isfinite(residuals)):
        msg = f"residuals must be a finite [n] array, got shape {residuals.shape!r}. Pass the 1-NN distances."
        raise InputError(msg)
    if not 0 <= fraction <= 1:
        msg = f"exemplar fraction must be in [0, 1], got {fraction!r}. Use e.g. 0.02 (2% of the training patches)."
        raise ConfigError(msg)
    e = min(int(np.ceil(fraction * len(residuals))), int(np.count_nonzero(residuals > 0)))
    order = np.lexsort((np.arange(len(residuals)), -residuals))  # largest residual first, then lower index
    return np.sort(order[:e])


def with_exemplars(bank_dist: np.ndarray, exemplar_dist: np.ndarray | None) -> np.ndarray:
    """[N] distance to the nearest centroid, [N] to the nearest exemplar (or None) -> [N] the smaller."""
    if exemplar_dist is None:
        return np.asarray(bank_dist)
    if np.shape(bank_dist) != np.shape(exemplar_dist):
        msg = f"distance arrays must match, got {np.shape(bank_dist)!r} and {np.shape(exemplar_dist)!r}."
        raise InputError(msg)
    return np.minimum(bank_dist, exemplar_dist)
