from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Banks with cpu_search: auto cache their measured choice per machine: keep it out of the user's cache.
    os.environ["OCBANK_CACHE_DIR"] = tempfile.mkdtemp(prefix="ocbank-test-cache-")
    # One CPU search in this process and every child it starts (CLI runs, Ray workers): the auto
    # choice is otherwise measured per process and thread count, and on a loaded machine two
    # measurements may disagree. tests/test_cpu_search.py unsets it to test the measured choice.
    # numpy is the search "auto" picked where it was measured (benchmarks/results/cpu_search_cpu.json);
    # OCBANK_CPU_SEARCH=faiss (or torch) runs the session on that GEMM instead.
    os.environ.setdefault("OCBANK_CPU_SEARCH", "numpy")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.pop("OCBANK_CACHE_DIR", ""), ignore_errors=True)
    os.environ.pop("OCBANK_CPU_SEARCH", None)


def clustered(n: int, dim: int, n_clusters: int, spread: float, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim)) * spread
    return (centers[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, dim)) * noise).astype(np.float32)


# float32 results move with batch size, thread count, instruction set and device: the backbone's
# features differ by ~2e-5 between a batch of 1 and of 4 (range ~29) on a 2-core EPYC, and by as
# much between 1 and 2 torch threads. Runs that differ in any of these agree to this fraction of
# the values' range, never exactly and never at 1e-5.
ACROSS_RUNS = 1e-4


def assert_close_across_runs(got, want, err_msg: str = "") -> None:
    """``got`` equals ``want`` to ``ACROSS_RUNS`` relative and ``ACROSS_RUNS`` of ``want``'s range."""
    want = np.asarray(want, dtype=np.float64)
    scale = float(np.abs(want).max()) if want.size else 0.0
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=ACROSS_RUNS,
                               atol=ACROSS_RUNS * scale, err_msg=err_msg)


def _duplicates(seed: int) -> np.ndarray:
    base = clustered(120, 24, 6, 3.0, 0.6, seed)
    rng = np.random.default_rng(seed)
    return base[rng.integers(0, len(base), 400)]  # many exact repeats


def _exact_radius() -> np.ndarray:
    # Integer coordinates: squared distances are exact in float32 and float64.
    # Row 1 lies at distance exactly r=5 (3-4-5) from row 0; row 3 exactly r
    # from row 2's centroid; the zero vector is equidistant (a tie) from two.
    rows = [[0, 0, 0, 0], [3, 4, 0, 0], [20, 0, 0, 0], [20, 0, 5, 0], [40, 0, 0, 0], [50, 0, 0, 0], [45, 0, 0, 0]]
    return np.array(rows * 3, dtype=np.float32)


STREAMS = {
    "clustered": (lambda: clustered(1500, 32, 20, 3.0, 0.7, 1), 4.0),
    "sparse": (lambda: clustered(600, 16, 200, 5.0, 0.3, 2), 1.5),
    "one_cluster": (lambda: clustered(800, 8, 1, 1.0, 1.0, 3), 2.5),
    "duplicates": (lambda: _duplicates(4), 2.0),
    "exact_radius_and_ties": (_exact_radius, 5.0),
}


@pytest.fixture(params=sorted(STREAMS))
def stream(request: pytest.FixtureRequest) -> tuple[np.ndarray, float]:
    make, radius = STREAMS[request.param]
    return make(), radius


# ---------------------------------------------------------------------- end to end
@pytest.fixture(scope="session")
def tiny_mvtec(tmp_path_factory: pytest.TempPathFactory):
    from ocbank.synthetic import make_dataset

    root = tmp_path_factory.mktemp("mvtec")
    return make_dataset(root, n_train=6, n_good_test=3, n_defect_test=2, size=80)


def tiny_config(root, **overrides) -> dict:
    cfg = {
        "data": {"format": "mvtec", "root": str(root), "resize": 72, "crop": 64, "batch_size": 4},
        "backbone": {"weights": "none"},
        "bank": {"radius": "auto", "radius_images": 3},
        "device": "cpu",
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


@pytest.fixture(scope="session")
def extractor():
    from ocbank.model.features import FeatureExtractor

    return FeatureExtractor(weights="none")
