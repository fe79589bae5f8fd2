"""A calibration that does not transfer to the test images is said, with a proper bound, in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import binom

from ocbank.cli import main
from ocbank.model.calibration import TRANSFER_SIGNIFICANCE, conservative_quantile, transfer_p_value

from .conftest import tiny_config


def test_transfer_p_value_is_the_chance_of_that_many_false_alarms_by_simulation():
    """Independent reference: calibrate on n uniform scores, count exceedances among m more, many times."""
    rng = np.random.default_rng(0)
    n, m, a, trials = 20, 30, 0.1, 20_000
    cal = rng.random((trials, n))
    thr = np.array([conservative_quantile(c, a) for c in cal])
    counts = (rng.random((trials, m)) > thr[:, None]).sum(1)
    for k in (1, 3, 6, 10):
        empirical = (counts >= k).mean()
        se = np.sqrt(empirical * (1 - empirical) / trials) + 1e-4
        assert abs(transfer_p_value(k, m, a, n) - empirical) < 4 * se, k
    # Same population: the warning fires at most about as often as its significance level.
    assert (np.array([transfer_p_value(int(c), m, a, n) for c in counts]) < TRANSFER_SIGNIFICANCE).mean() < 3e-3
    # More calibration images make the same excess more telling; a plain binomial at the target
    # (which ignores the calibration's own spread) would call 8 of 30 at 10% significant already.
    assert transfer_p_value(8, m, a, 9) > transfer_p_value(8, m, a, 200)
    assert binom.sf(7, m, a) < 0.05 < transfer_p_value(8, m, a, 9)


@pytest.mark.slow  # builds and evaluates through the CLI
def test_evaluate_warns_when_the_calibration_does_not_transfer(tmp_path, tiny_mvtec, caplog):
    """Calibrated on its own training images, tested on normal images of another surface: nearly all flagged."""
    src = Path(tiny_mvtec)
    root = tmp_path / "data"
    train, normal = root / "weave" / "train" / "good", root / "weave" / "test" / "good"
    train.mkdir(parents=True)
    normal.mkdir(parents=True)
    for p in sorted((src / "weave" / "train" / "good").glob("*.png")):
        (train / p.name).write_bytes(p.read_bytes())
    for i, p in enumerate(sorted((src / "dots").rglob("good/*.png"))):  # another surface, labelled normal
        (normal / f"{i:03d}.png").write_bytes(p.read_bytes())
    cfg = tmp_path / "c.yaml"
    # The radius rule's radius: with a radius so small that every training patch is its own centroid, the
    # training images would score exactly 0 and calibration on them is refused.
    cfg.write_text(yaml.safe_dump(tiny_config(root)))
    banks, out = tmp_path / "banks", tmp_path / "eval"
    assert main(["-q", "build", "--config", str(cfg), "--out", str(banks), "--calibration", str(train)]) == 0
    with caplog.at_level("WARNING"):
        assert main(["-q", "evaluate", "--config", str(cfg), "--banks", str(banks), "--out", str(out)]) == 0
    cal = json.loads((out / "metrics.json").read_text())["classes"]["weave"]["calibrated"]
    assert cal["fp"] == cal["fp"] + cal["tn"] == 9  # every normal test image flagged
    warning = cal["transfer_warning"]
    assert warning and "9 of 9 normal test images" in warning and "--calibration" in warning and "\n" not in warning
    assert sum(warning in r.getMessage() for r in caplog.records) == 1
    assert "Calibrate with --calibration on normal images from the line" in (out / "report.html").read_text()
