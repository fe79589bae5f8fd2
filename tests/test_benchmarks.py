"""The benchmark harness's smoke run, and the PatchCore coreset it compares with."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from benchmarks import run as harness
from benchmarks.patchcore import greedy_coreset

from .conftest import tiny_config


def test_greedy_coreset_is_farthest_point_sampling():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    idx = greedy_coreset(x, 0.05, proj_dim=128, seed=3)  # dim 6 < 128: no projection
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    # Reference: plain farthest-point iterations from the same start.
    ref = [int(idx[0])]
    d = np.linalg.norm(x - x[ref[0]], axis=1)
    for _ in range(19):
        ref.append(int(np.argmax(d)))
        d = np.minimum(d, np.linalg.norm(x - x[ref[-1]], axis=1))
    assert idx.tolist() == ref


def test_coreset_projects_high_dimensional_features():
    x = torch.randn(300, 1536)
    idx = greedy_coreset(x, 0.1)
    assert len(idx) == 30 and idx.max() < 300


@pytest.mark.slow
def test_harness_smoke_run(tmp_path, tiny_mvtec):
    import yaml

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_mvtec)))
    rows = harness.main(["--config", str(cfg), "--out", str(tmp_path / "out"), "--smoke", "--radii", "auto,20",
                         "--shards", "2", "--baselines", "padim,spade", "--modes", "nn,local_mean"])
    methods = [(r["method"], r.get("radius_setting"), r.get("coreset_ratio"), r.get("scoring")) for r in rows]
    banks = [("ocbank", "auto", None), ("ocbank", 20.0, None), ("ocbank_exemplars", "auto", None),
             ("ocbank_exemplars", 20.0, None), ("ocbank_sharded", "auto", None),
             ("patchcore_full", None, None), ("patchcore_coreset", None, 0.1)]
    assert methods == [(*b, m) for b in banks for m in ("nn", "local_mean")] + [
        ("padim", None, None, None), ("spade", None, None, None)]
    for mode in ("nn", "local_mean"):
        sharded = next(r for r in rows if r["method"] == "ocbank_sharded" and r["scoring"] == mode)
        seq = next(r for r in rows if r["method"] == "ocbank" and r["scoring"] == mode)
        assert sharded["k_minus_sequential"] == sharded["bank_vectors"] - seq["bank_vectors"]
        assert sharded["image_auroc_minus_sequential"] == sharded["image_auroc"] - seq["image_auroc"]
    # the two modes share the bank and the search: same bank, same pixel metrics (maps come from the grid)
    nn, lm = rows[0], rows[1]
    assert nn["bank_vectors"] == lm["bank_vectors"] and nn["pixel_auroc"] == lm["pixel_auroc"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["method"], r.get("scoring")) for r in saved] == [(r["method"], r.get("scoring")) for r in rows]
    for ex in (r for r in saved if r["method"] == "ocbank_exemplars"):
        plain = next(r for r in saved if r["method"] == "ocbank" and r["radius"] == ex["radius"])
        n_patches = ex["n_train"] * 8 * 8
        assert 0 < ex["n_exemplars"] <= math.ceil(0.02 * n_patches)
        assert ex["bank_vectors"] == plain["bank_vectors"] + ex["n_exemplars"]
        assert ex["bank_bytes"] == plain["bank_bytes"] + ex["n_exemplars"] * 1536 * 4
    padim = next(r for r in saved if r["method"] == "padim")
    assert padim["bank_vectors"] == 8 * 8 and padim["bank_bytes"] == 4 * 8 * 8 * (550 + 550 * 550)
    spade = next(r for r in saved if r["method"] == "spade")
    assert spade["bank_bytes"] == 4 * 1536 * (spade["n_train"] * 8 * 8 + spade["n_train"])
    md = (tmp_path / "out" / "results.md").read_text()
    assert "+ local mean" in md and "PaDiM (550 of 1536 dims)" in md
    needed = {"method", "class", "bank_vectors", "bank_bytes", "build_seconds", "peak_memory_bytes", "search_fps",
              "e2e_fps", "image_auroc", "pixel_auroc", "aupro", "device", "gemm_gflops"}
    for row in saved:
        assert needed <= set(row), needed - set(row)
        assert row["search_fps"] > 0 and row["e2e_fps"] > 0 and row["peak_memory_bytes"] > 0
        # Peak device memory for the build and for scoring, for every method: null with a note on the CPU.
        for key in ("build_device_memory", "score_device_memory"):
            assert row[key]["torch_max_allocated_bytes"] is None and "CUDA only" in row[key]["note"], (row["method"], key)
    full = next(r for r in saved if r["method"] == "patchcore_full")
    assert full["bank_vectors"] == full["n_train"] * 8 * 8
    coreset = next(r for r in saved if r["method"] == "patchcore_coreset")
    assert coreset["bank_vectors"] == pytest.approx(0.1 * full["bank_vectors"], abs=1)
    for name in ("results.md", "r_sweep.png", "memory_growth.png", "run_info.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    growth = json.loads((tmp_path / "out" / "run_info.json").read_text())["memory_growth"]
    assert growth["full_bytes"][-1] == full["bank_vectors"] * 1536 * 4


@pytest.mark.slow
def test_search_and_e2e_benchmarks_run_small(tmp_path):
    from benchmarks import bench_e2e, bench_search

    res = bench_search.main(["--out", str(tmp_path), "--device", "cpu", "--images", "6", "--clusters", "50",
                             "--query-images", "2"])
    assert res["full_vectors"] == 6 * 784 and res["ocbank_centroids"] < res["full_vectors"]
    assert res["ocbank_search_fps"] > 0 and res["full_search_fps"] > 0  # rates are benchmarks', not tests', to judge
    e2e = bench_e2e.main(["--out", str(tmp_path), "--device", "cpu", "--size", "64", "--batch", "2",
                          "--batches", "2", "--centroids", "100"])
    assert e2e["e2e_fps"] > 0 and (tmp_path / "e2e.json").is_file() and (tmp_path / "search.json").is_file()
    assert e2e["score_device_memory"]["torch_max_allocated_bytes"] is None and e2e["score_device_memory"]["note"]
