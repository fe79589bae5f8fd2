"""Calibration you can see: update prints the old and new thresholds, and calibration images the
bank already holds are named (their scores, so the thresholds, are biased low)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import yaml

from ocbank import ClusterBank
from ocbank.cli import main
from ocbank.data import Sample, shared_images

from .conftest import tiny_config


def test_shared_images_by_resolved_path_or_content(tmp_path):
    a, b, c = (tmp_path / n for n in ("a.png", "b.png", "c.png"))
    a.write_bytes(b"one image")
    b.write_bytes(b"one image")  # a copy of a
    c.write_bytes(b"two image")  # same size, other bytes
    (tmp_path / "d").mkdir()
    pool = [Sample(str(a))]
    found = shared_images([Sample(str(tmp_path / "d" / ".." / "a.png")), Sample(str(b)), Sample(str(c))], pool)
    assert [(Path(s.path).name, s.how) for s in found] == [("a.png", "same file"), ("b.png", "same content")]
    assert all(s.match == str(a) for s in found)


@pytest.fixture(scope="module")
def bank(tmp_path_factory, tiny_mvtec) -> Path:
    """A dots bank built with a seeded hold-out (one of the six training images calibrates it)."""
    tmp = tmp_path_factory.mktemp("calvis")
    cfg = tmp / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_mvtec, bank={"radius": 5.0}, data={"classes": ["dots"]},
                                              decision={"holdout": 0.1})))
    assert main(["-q", "build", "--config", str(cfg), "--out", str(tmp / "banks")]) == 0
    return tmp / "banks" / "dots.h5"


def _thresholds(path: Path) -> tuple[float, float]:
    d = ClusterBank.load(path).metadata_["decision"]
    return d["image_threshold"], d["pixel_threshold"]


@pytest.mark.slow
def test_update_names_calibration_images_in_the_bank_and_prints_both_thresholds(bank, tiny_mvtec, tmp_path, capsys,
                                                                                  caplog):
    root = Path(tiny_mvtec) / "dots"
    train = sorted((root / "train" / "good").glob("*.png"))
    held = ClusterBank.load(bank).metadata_["summary"]["calibration"]
    assert held == {"source": "holdout", "n_images": 1}
    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(sorted((root / "test" / "good").glob("*.png"))[0], new / "fresh.png")
    calibration = tmp_path / "cal"
    shutil.copytree(root / "train" / "good", calibration / "train")  # copies: found by content
    shutil.copy(new / "fresh.png", calibration / "fresh_copy.png")  # one of this update's new images
    with caplog.at_level(logging.WARNING):
        assert main(["-q", "update", "--bank", str(bank), "--input", str(new), "--calibration", str(calibration),
                     "--out", str(tmp_path / "u.h5")]) == 0
    warning = next(r.getMessage() for r in caplog.records if "already in the bank" in r.getMessage())
    assert "6 of the 7 calibration image(s) are already in the bank" in warning and "biased low" in warning
    assert "fresh_copy.png (same content as " in warning
    assert warning.count("(same content as ") == 5  # MAX_NAMED names, then "and 1 more"
    assert "and 1 more" in warning
    out = capsys.readouterr().out.splitlines()
    (old_image, old_pixel), (new_image, new_pixel) = _thresholds(bank), _thresholds(tmp_path / "u.h5")
    assert out[0] == f"thresholds: image {old_image:.4g} -> {new_image:.4g}, pixel {old_pixel:.4g} -> {new_pixel:.4g}"
    assert out[-1].endswith(f"wrote {tmp_path / 'u.h5'}")
    assert len(train) == 6


@pytest.mark.slow
def test_the_held_out_image_is_not_in_the_bank_and_fresh_images_raise_no_warning(bank, tiny_mvtec, tmp_path, caplog):
    root = Path(tiny_mvtec) / "dots"
    good = sorted((root / "test" / "good").glob("*.png"))
    new, calibration = tmp_path / "new", tmp_path / "cal"
    new.mkdir()
    shutil.copy(good[0], new / good[0].name)
    shutil.copytree(root / "train" / "good", calibration)  # the training folder itself: the same files
    with caplog.at_level(logging.WARNING):
        assert main(["-q", "update", "--bank", str(bank), "--input", str(new), "--calibration", str(calibration / ".."
                     / "cal"), "--out", str(tmp_path / "u.h5")]) == 0
    warning = next(r.getMessage() for r in caplog.records if "already in the bank" in r.getMessage())
    assert "5 of the 6 calibration image(s)" in warning  # the build held one out: that one is not in the bank
    caplog.clear()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for p in good[1:]:
        shutil.copy(p, fresh / p.name)
    with caplog.at_level(logging.WARNING):
        assert main(["-q", "update", "--bank", str(bank), "--input", str(new), "--calibration", str(fresh),
                     "--out", str(tmp_path / "v.h5")]) == 0
    assert not any("already in the bank" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_build_names_a_calibration_folder_that_is_its_training_folder(tiny_mvtec, tmp_path, caplog):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_mvtec, bank={"radius": 5.0}, data={"classes": ["dots"]})))
    with caplog.at_level(logging.WARNING):
        assert main(["-q", "build", "--config", str(cfg), "--out", str(tmp_path / "b"), "--calibration",
                     str(Path(tiny_mvtec) / "dots" / "train" / "good")]) == 0
    assert any("class dots: 6 of the 6 calibration image(s) are already in the bank" in r.getMessage()
               and "(same file as " in r.getMessage() for r in caplog.records)
