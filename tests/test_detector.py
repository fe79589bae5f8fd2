"""The Detector API: fit/predict on paths, PIL images and arrays; save/load; threads."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ocbank import Detector
from ocbank.data import DataError

from .conftest import tiny_config


@pytest.fixture(scope="module")
def fitted(tiny_mvtec, extractor):
    train = sorted((Path(tiny_mvtec) / "weave" / "train" / "good").glob("*.png"))
    det = Detector(tiny_config(tiny_mvtec), extractor=extractor)
    return det.fit([str(p) for p in train])


def _test_images(root):
    return sorted((Path(root) / "weave" / "test").rglob("*.png"))


def test_fit_records_radius_and_summary(fitted):
    assert fitted.bank.radius == pytest.approx(fitted.radius_stats_["p99"])
    assert fitted.fit_summary_["images_used"] == 6 and len(fitted.bank) > 0
    assert fitted.bank.n_seen == 6 * 8 * 8


def test_predict_accepts_paths_pil_and_arrays(fitted, tiny_mvtec):
    paths = _test_images(tiny_mvtec)[:3]
    s1, m1 = fitted.predict([str(p) for p in paths])
    pils = [Image.open(p).convert("RGB") for p in paths]
    s2, m2 = fitted.predict(pils)
    s3, m3 = fitted.predict([np.asarray(p) for p in pils])
    assert m1.shape == (3, 64, 64) and s1.shape == (3,)
    for s, m in ((s2, m2), (s3, m3)):
        np.testing.assert_allclose(s, s1, rtol=1e-5)
        np.testing.assert_allclose(m, m1, rtol=1e-5, atol=1e-5)
    assert np.allclose(s1, m1.max(axis=(1, 2)), rtol=0.5)  # smoothed maps stay near the scores


def test_defects_score_higher_than_normal_on_average(fitted, tiny_mvtec):
    paths = _test_images(tiny_mvtec)
    scores, _ = fitted.predict([str(p) for p in paths])
    bad = np.array(["good" not in str(p) for p in paths])
    assert scores[bad].mean() > scores[~bad].mean()


def test_save_load_round_trip(fitted, tiny_mvtec, tmp_path):
    fitted.save(tmp_path / "det.h5")
    again = Detector.load(tmp_path / "det.h5")
    paths = [str(p) for p in _test_images(tiny_mvtec)[:4]]
    np.testing.assert_allclose(again.predict(paths)[0], fitted.predict(paths)[0], rtol=1e-5)
    assert again.metadata_["backbone"]["weights"] == "none"
    assert again.metadata_["feature_grid"] == [8, 8]


def test_concurrent_predict_matches_serial(fitted, tiny_mvtec):
    paths = [str(p) for p in _test_images(tiny_mvtec)]
    groups = [paths[i::4] for i in range(4)] * 2
    serial = [fitted.predict(g) for g in groups]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(fitted.predict, groups))
    for (s_a, m_a), (s_b, m_b) in zip(serial, parallel):
        np.testing.assert_allclose(s_b, s_a, rtol=1e-5)
        np.testing.assert_allclose(m_b, m_a, rtol=1e-5, atol=1e-5)


def test_unreadable_image_gets_nan(fitted, tmp_path, tiny_mvtec):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    with pytest.warns(UserWarning, match="broken.png"):
        scores, maps = fitted.predict([str(broken), str(_test_images(tiny_mvtec)[0])])
    assert np.isnan(scores[0]) and np.isnan(maps[0]).all() and np.isfinite(scores[1])


def test_fit_without_usable_images_is_an_error(tmp_path, tiny_mvtec, extractor):
    det = Detector(tiny_config(tiny_mvtec, bank={"radius": 5.0}), extractor=extractor)
    with pytest.raises(DataError, match="no images"):
        det.fit([])
    broken = tmp_path / "b.png"
    broken.write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="could be read"):
        det.fit([str(broken)])
    with pytest.raises(RuntimeError, match="no bank"):
        det.predict([str(broken)])
