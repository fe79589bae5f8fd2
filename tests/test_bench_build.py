"""The benchmarks' shared helpers: results carry machine and date, are strict JSON, and the build
profile measures the real ClusterBank.add."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from benchmarks.bench_build import profile_add
from benchmarks.common import gemm_gflops, machine_info, stream_build, write_result


def _stream(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((30, 1536)).astype(np.float32) * 3
    x = centers[rng.integers(0, 30, 1500)] + rng.standard_normal((1500, 1536)).astype(np.float32) * 0.3
    return [x[i : i + 500] for i in range(0, 1500, 500)]


def test_profile_is_of_the_real_add_and_builds_the_same_bank():
    timed = stream_build(_stream(), radius=20.0)
    prof = profile_add(_stream(), radius=20.0)
    assert prof["k"] == timed["k"] == 30 and timed["n"] == 1500
    names = " ".join(f["function"] for f in prof["functions"])
    assert os.path.join("ocbank", "engine", "") in names  # the engine's own functions, not a copy of them
    shares = [f["own_share"] for f in prof["functions"]]
    assert all(0 <= s <= 1 for s in shares) and sum(shares) <= 1 + 1e-9


def test_results_record_machine_and_date_and_are_strict_json(tmp_path):
    info = machine_info()
    assert info["cpus"] >= 1 and info["date"][:4].isdigit()
    path = write_result(tmp_path, "r.json", {"machine": info, "rate": gemm_gflops(64, repeats=1)})
    assert json.loads(path.read_text())["machine"]["date"] == info["date"]
    with pytest.raises(ValueError):
        write_result(tmp_path, "bad.json", {"rate": math.nan})
