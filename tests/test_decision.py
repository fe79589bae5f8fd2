"""The OK/NG rule, written once (calibration.Decision.apply / is_ng): the same verdict in numpy and torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ocbank.errors import ConfigError
from ocbank.model.calibration import Decision, decision_metrics, is_ng


def test_ng_is_strictly_above_the_threshold_in_numpy_and_torch():
    d = Decision(2.0, 0.5)
    scores = np.array([1.0, 2.0, np.nextafter(np.float32(2.0), np.float32(3.0)), 5.0, np.nan], np.float32)
    maps = np.array([0.5, 0.25, 0.75, 1.0, np.nan], np.float32).reshape(5, 1, 1) * np.ones((1, 2, 2), np.float32)
    v = d.apply(scores, maps)
    assert v.ng.tolist() == [False, False, True, True, True]  # at the threshold is OK; NaN fails safe: NG
    assert v.normalized.dtype == np.float32
    np.testing.assert_array_equal(v.normalized[:4], scores[:4] / np.float32(2.0))
    assert v.mask[:, 0, 0].tolist() == [False, False, True, True, True]
    t = d.apply(torch.from_numpy(scores), torch.from_numpy(maps))
    np.testing.assert_array_equal(t.ng.numpy(), v.ng)
    np.testing.assert_array_equal(t.mask.numpy(), v.mask)
    np.testing.assert_array_equal(t.normalized.numpy(), v.normalized)
    assert d.apply(scores).mask is None
    # Plain numbers follow the same rule (the report checks one score at a time).
    assert [is_ng(x, 2.0) for x in (1.0, 2.0, 2.5, float("nan"))] == [False, False, True, True]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0, 10, width=32), min_size=1, max_size=20), st.floats(0.5, 9, width=32))
def test_decision_metrics_counts_the_same_rule(scores, threshold):
    scores = np.array(scores, np.float32)
    labels = np.arange(scores.size) % 2
    m = decision_metrics(labels, scores, threshold)
    ng = Decision(float(threshold), 1.0).apply(scores).ng
    assert m["tp"] == int((ng & (labels == 1)).sum()) and m["fp"] == int((ng & (labels == 0)).sum())
    assert m["tp"] + m["fp"] + m["fn"] + m["tn"] == scores.size


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "1.0"])
def test_thresholds_must_be_finite_and_positive(bad):
    with pytest.raises(ConfigError, match="image_threshold"):
        Decision(bad, 1.0)
    with pytest.raises(ConfigError, match="pixel_threshold"):
        Decision(1.0, bad)


def test_numpy_thresholds_are_taken_as_plain_floats():
    d = Decision(np.float32(2.5), np.float64(0.5))
    assert type(d.image_threshold) is float and type(d.pixel_threshold) is float
    assert d.to_dict()["image_threshold"] == 2.5 and d.apply(np.array([2.5, 3.0], np.float32)).ng.tolist() == [False, True]


def test_metadata_round_trip_and_target():
    d = Decision(3.0, 4.0, 0.01, 50, "holdout", attainable_false_alarm_rate=1 / 51)
    assert Decision.from_dict(d.to_dict()) == d
    assert not d.target_met and Decision(3.0, 4.0, 0.1, 50, "folder", attainable_false_alarm_rate=1 / 51).target_met
    assert Decision(3.0, 4.0).target_met  # thresholds given, not calibrated: no target to miss


def test_a_detector_labels_unscored_inputs_minus_one_and_gives_them_no_defect_pixels():
    from ocbank.model.detector import Detector

    det = Detector(weights="none", radius=1.0)
    det.decision_ = Decision(2.0, 0.5)
    scores = np.array([1.0, np.nan, 3.0], np.float32)  # the middle input was skipped
    maps = np.stack([np.full((4, 4), v, np.float32) for v in (0.25, np.nan, 1.0)])
    pred = det._decide(scores, maps, (1,))
    assert pred.labels.tolist() == [0, -1, 1]
    assert pred.masks[:, 0, 0].tolist() == [False, False, True]
