"""The line-timed copy of the store's chunk loop stays faithful to the engine (it is what the profile measures)."""

from __future__ import annotations

import numpy as np

from benchmarks.bench_build import line_timed_build


def test_line_timed_build_matches_clusterbank():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((30, 1536)).astype(np.float32) * 3
    x = centers[rng.integers(0, 30, 1500)] + rng.standard_normal((1500, 1536)).astype(np.float32) * 0.3
    out = line_timed_build([x[i : i + 500] for i in range(0, 1500, 500)], radius=20.0)
    assert out["matches_clusterbank"] and out["k"] == 30
    assert abs(sum(out["share"].values()) - 1.0) < 1e-9
