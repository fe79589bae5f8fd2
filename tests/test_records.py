"""The typed records between layers round-trip through their JSON dicts (bank metadata, summaries)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ocbank.model.progress import FitProgress, FitStep
from ocbank.model.radius import RadiusStats, estimate_radius


def test_fit_progress_adds_up_and_round_trips():
    a, b = FitProgress(3, ("x.png",), 1.5), FitProgress(2, ("y.png", "z.png"), 0.25)
    total = a + b
    assert (total.images_used, total.skipped_files, total.seconds) == (5, ("x.png", "y.png", "z.png"), 1.75)
    assert total.images_skipped == 3
    d = json.loads(json.dumps(total.to_dict()))  # JSON-ready as it stands
    assert d == {"images_used": 5, "images_skipped": 3, "skipped_files": ["x.png", "y.png", "z.png"], "seconds": 1.75}
    assert FitProgress.from_dict(d) == total
    assert FitProgress.from_dict({}) == FitProgress()  # an old checkpoint without the record
    step = FitStep("bank", 7, 10, total)
    assert step.to_dict() == {"phase": "bank", "position": 7, "n_images": 10, **d}


def test_radius_stats_round_trip_keeps_the_metadata_dict():
    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    est = estimate_radius(x, max_queries=50)
    stats = RadiusStats(est.radius, est, n_images=4)
    d = json.loads(json.dumps(stats.to_dict()))
    assert d == {**est.as_stats(), "n_images": 4} and stats.source == "rule"
    back = RadiusStats.from_dict(d)
    assert back == stats and back.to_dict() == d
    config = RadiusStats(26.0)
    assert config.to_dict() == {"suggested": 26.0, "source": "config"} and RadiusStats.from_dict(config.to_dict()) == config
    assert RadiusStats.from_dict({}) is None and RadiusStats.from_dict(None) is None
    assert back.estimate.percentiles["p99"] == pytest.approx(est.percentiles["p99"])
