"""The fitting state machine: one seeded radius-sample rule, then the bank, however the images are batched."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocbank.config import PARAMETERS, Config, ConfigError, config_from_parameters, from_dict, parameters_of
from ocbank.engine import ClusterBank
from ocbank.errors import DataError, InputError
from ocbank.model.builder import BankBuilder, FittedBank, radius_sample, training_order
from ocbank.model.features import FEATURE_DIM
from ocbank.model.radius import estimate_radius, sample_images

PATCHES = 5  # patches per synthetic image


def _config(radius: float | str = "auto", radius_images: int = 3, seed: int = 0) -> Config:
    return from_dict({"bank": {"radius": radius, "radius_images": radius_images, "seed": seed}, "device": "cpu"},
                     require_root=False)


def _images(n: int, seed: int = 0) -> np.ndarray:
    """Synthetic patch features [n, PATCHES, 1536]: a few modes plus noise, so some patches are absorbed."""
    rng = np.random.default_rng(seed)
    modes = rng.normal(size=(4, FEATURE_DIM)).astype(np.float32)
    picks = rng.integers(0, len(modes), size=(n, PATCHES))
    return (modes[picks] + 0.05 * rng.normal(size=(n, PATCHES, FEATURE_DIM))).astype(np.float32)


def _fit(builder: BankBuilder, images: np.ndarray, cuts: list[int]) -> FittedBank:
    """Feed ``images`` in ``builder.order`` as batches split at ``cuts``."""
    ordered = images[builder.order]
    bounds = [0, *sorted(set(cuts)), len(ordered)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        if hi > lo:
            builder.feed(ordered[lo:hi])
    return builder.finish()


def _plain(images: np.ndarray, radius: float) -> ClusterBank:
    bank = ClusterBank(FEATURE_DIM, radius)
    for image in images:
        bank.add(image)
    return bank


def test_the_radius_sample_is_seeded_and_streams_first():
    cfg = _config(radius_images=3, seed=5)
    builder = BankBuilder(cfg, 8)
    assert builder.sample == sample_images(8, 3, 5) == radius_sample(8, cfg)
    assert builder.order[:3] == builder.sample and sorted(builder.order) == list(range(8))
    assert builder.order == training_order(8, cfg) and builder.phase == "radius"
    fixed = BankBuilder(_config(radius=1.5), 8)
    assert fixed.sample == [] and fixed.order == list(range(8)) and fixed.phase == "bank"
    assert fixed.radius_stats.suggested == 1.5 and fixed.radius_stats.source == "config"


def test_radius_comes_from_the_sample_alone_and_the_bank_is_plain_algorithm_1():
    images = _images(7)
    builder = BankBuilder(_config(radius_images=3), len(images))
    fitted = _fit(builder, images, [2, 5])  # the first batch ends inside the sample, the second after it
    sample = images[builder.sample].reshape(-1, FEATURE_DIM)
    assert fitted.radius_stats.suggested == pytest.approx(estimate_radius(sample).radius, rel=1e-6)
    assert fitted.radius_stats.n_images == 3
    ref = _plain(images[builder.order], fitted.radius_stats.suggested)
    np.testing.assert_array_equal(fitted.bank.counts, ref.counts)
    np.testing.assert_allclose(fitted.bank.means, ref.means, rtol=0, atol=1e-5)
    assert fitted.bank.n_seen == 7 * PATCHES


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, 8), max_size=6), radius_images=st.integers(1, 9))
def test_feeding_in_any_pieces_equals_feeding_image_by_image(cuts, radius_images):
    images = _images(9, seed=1)
    cfg = _config(radius_images=radius_images)
    whole = _fit(BankBuilder(cfg, 9), images, list(range(1, 9)))
    pieces = _fit(BankBuilder(cfg, 9), images, cuts)
    assert pieces.radius_stats.suggested == pytest.approx(whole.radius_stats.suggested, rel=1e-6)
    np.testing.assert_array_equal(pieces.bank.counts, whole.bank.counts)
    np.testing.assert_allclose(pieces.bank.means, whole.bank.means, rtol=0, atol=1e-5)


def test_unreadable_images_count_toward_the_sample_and_none_readable_is_refused():
    images = _images(4)
    builder = BankBuilder(_config(radius_images=3), 4)
    builder.feed(images[:1], n_unreadable=2)  # the sample's 3: one read, two not
    assert builder.phase == "bank" and builder.radius_stats.n_images == 1
    builder.feed(images[1:2])
    assert builder.finish().bank.n_seen == 2 * PATCHES

    none = BankBuilder(_config(radius_images=2), 4)
    with pytest.raises(DataError, match="none of the 2 radius-sample images could be read"):
        none.feed(np.zeros((0, PATCHES, FEATURE_DIM), np.float32), n_unreadable=2)


def test_a_sample_cut_short_is_closed_by_finish():
    images = _images(2)
    builder = BankBuilder(_config(radius_images=5), 10)  # sized for 10 images, only 2 come
    builder.feed(images)
    assert builder.phase == "radius"
    fitted = builder.finish()
    assert fitted.radius_stats.n_images == 2 and fitted.bank.n_seen == 2 * PATCHES


def test_a_continuing_builder_streams_into_the_bank_it_was_given():
    first = _fit(BankBuilder(_config(radius=2.0), 3), _images(3), [])
    n_seen = first.bank.n_seen
    more = BankBuilder.continuing(_config(radius=2.0), first)
    assert more.phase == "bank" and more.bank is first.bank
    more.feed(_images(2, seed=3))
    assert more.finish().bank is first.bank and first.bank.n_seen == n_seen + 2 * PATCHES


def test_features_of_the_wrong_shape_are_refused_by_name():
    builder = BankBuilder(_config(radius=1.0), 1)
    with pytest.raises(InputError, match=r"\[B, \.\.\., 1536\].*got shape \(2, 5, 7\)"):
        builder.feed(np.zeros((2, 5, 7), np.float32))
    with pytest.raises(InputError, match="n_images"):
        BankBuilder(_config(), -1)


def test_detector_parameters_are_config_fields_with_config_defaults():
    from ocbank import Detector

    signature = inspect.signature(Detector.__init__).parameters
    names = [n for n in signature if n not in ("self", "extractor")]
    assert sorted(names) == sorted(PARAMETERS)
    defaults = parameters_of(Config())
    for name in names:
        expected = None if name == "resize" else defaults[name]  # None: derived from image_size
        assert signature[name].default == expected, name
    params = {"weights": "none", "radius": 0.7, "image_size": 96, "seed": 3, "sigma": 2.0, "device": "cpu"}
    cfg = config_from_parameters(**params)
    assert cfg.data.resize == round(96 * 256 / 224) and cfg.bank.radius == 0.7
    assert {k: v for k, v in parameters_of(cfg).items() if k in params} == params
    assert Detector(**params).config == cfg
    with pytest.raises(ConfigError, match="unknown parameter"):
        config_from_parameters(radius_image=3)


def test_a_batch_with_unreadable_images_may_not_cross_the_sample_end():
    builder = BankBuilder(_config(radius_images=3), 6)
    builder.feed(_images(1, seed=1))
    with pytest.raises(InputError, match=r"crosses the radius sample's end \(2 image\(s\) of the sample left"):
        builder.feed(_images(2, seed=2), n_unreadable=1)  # which of the three was unreadable decides the sample
    builder.feed(_images(1, seed=3), n_unreadable=1)  # ends exactly at the sample's end: allowed
    assert builder.phase == "bank" and builder.radius_stats.n_images == 2


def test_radius_statistics_of_no_images_is_refused_by_name():
    from ocbank import Detector

    with pytest.raises(DataError, match=r"radius_statistics\(\) got no images"):
        Detector(weights="none", image_size=64).radius_statistics([])
