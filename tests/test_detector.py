"""The Detector API: keyword parameters, fit/predict on every input kind, calibration, save/load, threads."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ocbank import Detector
from ocbank.config import ConfigError
from ocbank.data import DataError, Transform, open_image
from ocbank.engine.checkpoint import read_metadata
from ocbank.errors import InputError, InputTypeError, NotFittedError
from ocbank.model.builder import training_order
from ocbank.model.calibration import conservative_quantile
from ocbank.model.features import FEATURE_DIM
from ocbank.model.radius import nearest_other_distances

from .conftest import assert_close_across_runs, tiny_config


def _train(root) -> list[str]:
    return [str(p) for p in sorted((Path(root) / "weave" / "train" / "good").glob("*.png"))]


def _test_images(root) -> list[Path]:
    return sorted((Path(root) / "weave" / "test").rglob("*.png"))


@pytest.fixture(scope="module")
def fitted(tiny_mvtec, extractor):
    det = Detector.from_config(tiny_config(tiny_mvtec), extractor=extractor)
    return det.fit(_train(tiny_mvtec))


def _as_batch(paths: list[Path], size: int = 64, resize: int = 72) -> torch.Tensor:
    """The documented tensor input: resized and cropped RGB in [0, 1], [N, 3, S, S]."""
    rgb = [Transform(resize, size).image(open_image(str(p)))[1] for p in paths]
    return torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float() / 255.0


def test_keyword_parameters_equal_the_config_route(tiny_mvtec, extractor):
    det = Detector(weights="none", radius=5.0, image_size=64, resize=72, batch_size=4, device="cpu", extractor=extractor)
    cfg = tiny_config(tiny_mvtec, bank={"radius": 5.0})
    other = Detector.from_config(cfg, extractor=extractor)
    assert det.config.backbone == other.config.backbone and det.config.bank.radius == other.config.bank.radius
    assert det.config.image_size == 64 and det.config.data.resize == 72
    assert Detector().config.image_size == 224 and Detector().config.data.resize == 256
    assert Detector(image_size=512).config.data.resize == 585


def test_init_validates_and_does_nothing_else():
    det = Detector(weights="none")
    assert det._extractor is None and "bank_" not in det.__dict__  # nothing loaded or built
    for bad in ({"sigma": -1.0}, {"sigma": float("nan")}, {"radius": float("inf")}, {"radius": 1e200},
                {"pool": "max"}, {"image_size": 300, "resize": 256}, {"device": "tpu"}, {"num_workers": 10_000}):
        with pytest.raises(ConfigError):
            Detector(**bad)
    with pytest.raises(NotFittedError, match="no bank"):
        det.predict(np.zeros((8, 8, 3), np.uint8))


@pytest.mark.slow
def test_fit_records_radius_and_summary(fitted, tiny_mvtec):
    assert fitted.bank.radius_ == pytest.approx(fitted.radius_stats_.estimate.percentiles["p99"])
    # One pass: the radius comes from the sampled images' features, exactly as the rule on them alone.
    sample = [_train(tiny_mvtec)[i] for i in training_order(6, fitted.config)[:3]]
    feats = fitted.extractor(_normalised([Path(p) for p in sample])).reshape(-1, FEATURE_DIM).numpy()
    assert fitted.bank.radius_ == pytest.approx(float(np.percentile(nearest_other_distances(feats), 99)), rel=1e-5)
    assert fitted.fit_summary_.images_used == 6 and len(fitted.bank) > 0
    assert fitted.bank.n_seen == 6 * 8 * 8


@pytest.mark.slow
def test_fit_resets_fitted_state(tiny_mvtec, extractor):
    paths = _train(tiny_mvtec)
    det = Detector.from_config(tiny_config(tiny_mvtec), extractor=extractor)
    det.fit(paths[:3])
    det.decision_ = "stale"  # any fitted attribute must go
    det.fit(paths)
    fresh = Detector.from_config(tiny_config(tiny_mvtec), extractor=extractor).fit(paths)
    assert "decision_" not in det.__dict__
    np.testing.assert_array_equal(det.bank.counts, fresh.bank.counts)
    np.testing.assert_array_equal(det.bank.means, fresh.bank.means)


@pytest.mark.slow
def test_scores_are_the_max_patch_distance(fitted, tiny_mvtec):
    """Independent reference: features -> bank.search -> max, and the smoothed map never exceeds it."""
    paths = _test_images(tiny_mvtec)[:3]
    pred = fitted.predict([str(p) for p in paths])
    feats = fitted.extractor(_normalised(paths)).reshape(-1, FEATURE_DIM)
    dist, _ = fitted.bank.search(feats, k=1)
    np.testing.assert_allclose(pred.scores, dist.reshape(3, -1).max(axis=1), rtol=1e-5)
    assert (pred.maps.reshape(3, -1).max(axis=1) <= pred.scores * (1 + 1e-5)).all()
    assert (pred.maps.reshape(3, -1).max(axis=1) >= dist.reshape(3, -1).min(axis=1)).all()


def _normalised(paths: list[Path]) -> torch.Tensor:
    return torch.stack([Transform(72, 64).image(open_image(str(p)))[0] for p in paths])


@pytest.mark.slow
def test_predict_accepts_every_input_kind(fitted, tiny_mvtec):
    paths = _test_images(tiny_mvtec)[:3]
    ref = fitted.predict([str(p) for p in paths])
    pils = [Image.open(p).convert("RGB") for p in paths]
    for other in (fitted.predict(pils), fitted.predict([np.asarray(p) for p in pils])):
        np.testing.assert_allclose(other.scores, ref.scores, rtol=1e-5)
        np.testing.assert_allclose(other.maps, ref.maps, rtol=1e-5, atol=1e-5)
    tensor = fitted.predict(_as_batch(paths))
    np.testing.assert_allclose(tensor.scores, ref.scores, rtol=1e-5)
    np.testing.assert_allclose(tensor.maps, ref.maps, rtol=1e-5, atol=1e-5)
    one = fitted.predict(str(paths[0]))  # one path, not a sequence of characters
    assert one.scores.shape == (1,)  # a batch of one against a batch of three: float32 sums differ
    assert_close_across_runs(one.scores, ref.scores[:1])
    assert_close_across_runs(one.maps, ref.maps[:1])
    assert fitted.predict(paths[0]).scores.shape == (1,) and fitted.predict(pils[0]).scores.shape == (1,)
    assert fitted.predict(np.asarray(pils[0])).scores.shape == (1,)
    with pytest.raises(InputTypeError, match="images\\[1\\]"):
        fitted.predict([str(paths[0]), 42])
    with pytest.raises(InputTypeError):
        fitted.predict(42)
    with pytest.raises(InputError, match="64, 64"):
        fitted.predict(torch.zeros(2, 3, 32, 32))


@pytest.mark.slow
def test_defects_score_higher_than_normal_on_average(fitted, tiny_mvtec):
    paths = _test_images(tiny_mvtec)
    scores = fitted.predict([str(p) for p in paths]).scores
    bad = np.array(["good" not in str(p) for p in paths])
    assert scores[bad].mean() > scores[~bad].mean()


@pytest.mark.slow
def test_calibrated_decisions(tiny_mvtec, extractor):
    paths = _train(tiny_mvtec)
    det = Detector.from_config(tiny_config(tiny_mvtec, decision={"false_alarm_rate": 0.2}), extractor=extractor)
    det.fit(paths[:4]).calibrate(paths[4:])
    normal = det.predict(paths[4:])
    assert det.decision.image_threshold == pytest.approx(conservative_quantile(normal.scores, 0.2))
    assert det.decision.n_images == 2 and det.decision.false_alarm_rate == 0.2
    assert det.decision.attainable_false_alarm_rate == pytest.approx(1 / 3) and not det.decision.target_met
    pred = det.predict([str(p) for p in _test_images(tiny_mvtec)])
    np.testing.assert_array_equal(pred.labels, (pred.scores > det.decision.image_threshold).astype(np.int8))
    np.testing.assert_allclose(pred.normalized, pred.scores / det.decision.image_threshold, rtol=1e-6)
    np.testing.assert_array_equal(pred.masks, pred.maps > det.decision.pixel_threshold)
    assert Detector.from_config(tiny_config(tiny_mvtec), extractor=extractor).fit(paths).predict(paths[0]).labels is None


def test_conservative_quantile_is_the_conformal_order_statistic():
    v = np.arange(1, 101, dtype=float)  # 100 values
    assert conservative_quantile(v, 0.05) == 96.0  # ceil(0.95 * 101) = 96th smallest
    assert conservative_quantile(v[:10], 0.01) == 10.0  # too few values: the maximum
    rng = np.random.default_rng(0)
    exceed = [np.mean(rng.random(2000) > conservative_quantile(rng.random(200), 0.1)) for _ in range(200)]
    assert np.mean(exceed) <= 0.1 + 0.01  # the bound holds on average


@pytest.mark.slow
def test_partial_fit_equals_one_fit_over_both(tiny_mvtec, extractor):
    paths = _train(tiny_mvtec)
    cfg = tiny_config(tiny_mvtec, bank={"radius": 5.0})
    step = Detector.from_config(cfg, extractor=extractor).fit(paths[:3]).partial_fit(paths[3:])
    once = Detector.from_config(cfg, extractor=extractor).fit(paths)
    np.testing.assert_array_equal(step.bank.counts, once.bank.counts)
    assert_close_across_runs(step.bank.means, once.bank.means)  # batches of 3+3 against 4+2
    assert step.fit_summary_.images_used == 6 and step.last_partial_fit_.images_used == 3
    with pytest.warns(UserWarning):
        step.partial_fit([paths[0], "/nonexistent/x.png"])
    assert step.last_partial_fit_.skipped_files == ("/nonexistent/x.png",)
    assert step.fit_summary_.skipped_files[-1] == "/nonexistent/x.png" and step.fit_summary_.images_skipped == 1


@pytest.mark.slow
@pytest.mark.parametrize("radius", [5.0, "auto"])
def test_tensor_fit_equals_path_fit(tiny_mvtec, extractor, radius):
    paths = [Path(p) for p in _train(tiny_mvtec)]
    cfg = tiny_config(tiny_mvtec, bank={"radius": radius})
    a = Detector.from_config(cfg, extractor=extractor).fit([str(p) for p in paths])
    b = Detector.from_config(cfg, extractor=extractor).fit(_as_batch(paths))
    assert a.bank.radius_ == pytest.approx(b.bank.radius_, rel=1e-6)
    np.testing.assert_array_equal(a.bank.counts, b.bank.counts)
    np.testing.assert_allclose(a.bank.means, b.bank.means, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputTypeError):  # a failed fit leaves nothing half-built
        b.fit(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert "bank_" not in b.__dict__


@pytest.mark.slow
def test_save_load_round_trip(fitted, tiny_mvtec, tmp_path):
    fitted.save(tmp_path / "det.h5")
    again = Detector.load(tmp_path / "det.h5")
    paths = [str(p) for p in _test_images(tiny_mvtec)[:4]]
    np.testing.assert_allclose(again.predict(paths).scores, fitted.predict(paths).scores, rtol=1e-5)
    meta = read_metadata(tmp_path / "det.h5")
    assert meta["backbone"]["weights"] == "none"
    assert meta["feature_grid"] == [8, 8]
    assert again.config == fitted.config


@pytest.mark.slow
def test_concurrent_predict_matches_serial(fitted, tiny_mvtec):
    paths = [str(p) for p in _test_images(tiny_mvtec)]
    groups = [paths[i::4] for i in range(4)] * 2
    serial = [fitted.predict(g) for g in groups]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(fitted.predict, groups))
    for a, b in zip(serial, parallel):
        assert_close_across_runs(b.scores, a.scores)  # torch's threads are shared by eight callers
        assert_close_across_runs(b.maps, a.maps)


@pytest.mark.slow
def test_unreadable_image_gets_nan(fitted, tmp_path, tiny_mvtec):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    with pytest.warns(UserWarning, match="broken.png"):
        pred = fitted.predict([str(broken), str(_test_images(tiny_mvtec)[0])])
    assert np.isnan(pred.scores[0]) and np.isnan(pred.maps[0]).all() and np.isfinite(pred.scores[1])
    assert pred.skipped == (0,)


def test_fit_without_usable_images_is_an_error(tmp_path, tiny_mvtec, extractor):
    det = Detector.from_config(tiny_config(tiny_mvtec, bank={"radius": 5.0}), extractor=extractor)
    with pytest.raises(DataError, match="no images"):
        det.fit([])
    broken = tmp_path / "b.png"
    broken.write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="could be read"):
        det.fit([str(broken)])
    with pytest.raises(NotFittedError, match="no bank"):
        det.predict([str(broken)])


@pytest.mark.slow
def test_fit_reads_every_image_through_the_backbone_once(tiny_mvtec, extractor, monkeypatch):
    seen: list[int] = []
    real = type(extractor).forward

    def counting(self, images):
        seen.append(images.shape[0])
        return real(self, images)

    monkeypatch.setattr(type(extractor), "forward", counting)
    det = Detector.from_config(tiny_config(tiny_mvtec), extractor=extractor).fit(_train(tiny_mvtec))
    assert sum(seen) == 6 and det.bank.n_seen == 6 * 8 * 8  # radius: auto, and still one pass


@pytest.mark.slow
def test_radius_sample_spills_to_disk_and_gives_the_same_bank(tiny_mvtec, extractor, monkeypatch):
    from ocbank.model import builder as builder_mod

    ref = Detector.from_config(tiny_config(tiny_mvtec), extractor=extractor).fit(_train(tiny_mvtec))
    monkeypatch.setattr(builder_mod, "SPOOL_MEMORY_BYTES", 4 * FEATURE_DIM * 70)  # 70 rows, then a memmap
    spilled = Detector.from_config(tiny_config(tiny_mvtec), extractor=extractor).fit(_train(tiny_mvtec))
    assert spilled.bank.radius_ == ref.bank.radius_
    np.testing.assert_array_equal(spilled.bank.counts, ref.bank.counts)
    np.testing.assert_array_equal(spilled.bank.means, ref.bank.means)


@pytest.mark.slow
def test_memory_cap_from_config_bounds_the_bank_and_is_saved(tiny_mvtec, extractor, tmp_path):
    det = Detector.from_config(tiny_config(tiny_mvtec, bank={"radius": 1.0, "max_centroids": 20}), extractor=extractor)
    det.fit(_train(tiny_mvtec))
    assert len(det.bank) < 20 and det.bank.radius_ > 1.0 and det.bank.n_seen == 6 * 8 * 8
    assert det.bank.radius_history_ and det.bank.radius_history_[-1]["new"] == det.bank.radius_
    det.save(tmp_path / "capped.h5")
    again = Detector.load(tmp_path / "capped.h5")
    assert again.bank.max_centroids == 20 and again.bank.radius_history_ == det.bank.radius_history_


@pytest.mark.slow
def test_scoring_modes_from_config(tiny_mvtec, extractor):
    """scoring.mode changes only the image score: the max of the grid smoothed as scipy does (edges repeated)."""
    from scipy.ndimage import gaussian_filter, uniform_filter

    reference = {
        "local_mean": lambda g: uniform_filter(g.astype(np.float64), size=(1, 3, 3), mode="nearest"),
        "local_gauss": lambda g: gaussian_filter(g.astype(np.float64), sigma=(0, 1.0, 1.0), mode="nearest", truncate=4.0),
    }
    paths = [str(p) for p in _test_images(tiny_mvtec)[:4]]
    base = Detector.from_config(tiny_config(tiny_mvtec, bank={"radius": 5.0}), extractor=extractor).fit(_train(tiny_mvtec))
    ref = base.predict(paths)
    grids = []
    for res_batch in [base]:
        feats = res_batch.extractor(_normalised([Path(p) for p in paths])).reshape(-1, FEATURE_DIM)
        grids.append(res_batch.bank.search(feats)[0].reshape(4, 8, 8))
    for mode in ("local_mean", "local_gauss"):
        det = Detector.from_config(tiny_config(tiny_mvtec, bank={"radius": 5.0}, scoring={"mode": mode}),
                                   extractor=extractor)
        det.bank_ = base.bank
        pred = det.predict(paths)
        np.testing.assert_allclose(pred.maps, ref.maps, rtol=1e-6)
        np.testing.assert_allclose(pred.scores, reference[mode](grids[0]).reshape(4, -1).max(axis=1), rtol=1e-5)
        assert (pred.scores <= ref.scores + 1e-4).all() and not np.allclose(pred.scores, ref.scores)
    with pytest.raises(ConfigError, match="scoring.mode"):
        Detector.from_config(tiny_config(tiny_mvtec, scoring={"mode": "spread"}))


def test_read_with_changes_how_images_are_read_never_the_features():
    import dataclasses

    det = Detector(weights="none", image_size=64, batch_size=4)
    scoring = det.config.scoring
    det.read_with(dataclasses.replace(det.config.data, batch_size=9, num_workers=1, root="elsewhere"))
    assert (det.config.data.batch_size, det.config.data.num_workers, det.config.data.root) == (9, 1, "elsewhere")
    assert det.config.scoring == scoring and det.config.image_size == 64
    for changed in ({"crop": 56}, {"resize": 80}):
        with pytest.raises(ConfigError, match="Keep the bank's data.resize and data.crop"):
            det.read_with(dataclasses.replace(det.config.data, **changed))
    assert det.config.data.batch_size == 9
