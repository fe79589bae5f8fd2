"""Inputs as users send them: linked and littered folders, file names beyond ASCII, tensors out of range."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from ocbank import Detector
from ocbank.cli import main
from ocbank.data import Transform, images_in, open_image

from .conftest import assert_close_across_runs, tiny_config


def _train(root) -> list[str]:
    return [str(p) for p in sorted((Path(root) / "weave" / "train" / "good").glob("*.png"))]


def _good(root) -> list[Path]:
    return sorted((Path(root) / "weave" / "test" / "good").glob("*.png"))


@pytest.fixture(scope="module")
def banks(tmp_path_factory, tiny_mvtec, extractor) -> dict[str, Path]:
    """An uncalibrated and a calibrated weave bank, saved once for the tests below."""
    tmp = tmp_path_factory.mktemp("banks")
    paths = _train(tiny_mvtec)
    det = Detector.from_config(tiny_config(tiny_mvtec, bank={"radius": 5.0}), extractor=extractor).fit(paths[:4])
    det.save(tmp / "plain.h5")
    det.calibrate(paths[4:]).save(tmp / "calibrated.h5")
    return {"plain": tmp / "plain.h5", "calibrated": tmp / "calibrated.h5"}


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "scores.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------- folders
def test_links_are_followed_dangling_ones_counted_and_resource_forks_ignored(tmp_path, tiny_mvtec, banks, capsys):
    good = _good(tiny_mvtec)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.png").write_bytes(good[1].read_bytes())
    top = tmp_path / "in"
    (top / ".hidden").mkdir(parents=True)
    (top / "__MACOSX").mkdir()
    (top / "a.png").write_bytes(good[0].read_bytes())
    (top / "linked").symlink_to(elsewhere, target_is_directory=True)  # a symlinked sub-folder
    (top / "loop").symlink_to(top, target_is_directory=True)  # a link back up: walked once
    (top / "gone.png").symlink_to(tmp_path / "nowhere.png")  # a dangling link
    (top / "._a.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # macOS AppleDouble resource fork
    (top / ".hidden" / "c.png").write_bytes(good[2].read_bytes())
    (top / "__MACOSX" / "._a.png").write_bytes(b"\x00\x05\x16\x07")
    assert [p.relative_to(top).as_posix() for p in images_in(top)] == ["a.png", "gone.png", "linked/b.png"]

    out = tmp_path / "out"
    assert main(["-q", "predict", "--bank", str(banks["plain"]), "--input", str(top), "--out", str(out)]) == 1
    assert "1 of the 3 input image(s) could not be scored" in capsys.readouterr().err
    rows = {Path(r["path"]).name: r["status"] for r in _rows(out)}
    assert rows == {"a.png": "ok", "gone.png": "unreadable", "b.png": "ok"}


# ---------------------------------------------------------------------- tensors
def _unit_batch(paths: list[Path]) -> torch.Tensor:
    """The documented tensor input: resized and cropped RGB in [0, 1], [N, 3, 64, 64]."""
    rgb = [Transform(72, 64).image(open_image(str(p)))[1] for p in paths]
    return torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float() / 255.0


def test_a_tensor_in_0_255_follows_the_array_rule_skipped_by_name(banks, tiny_mvtec):
    det = Detector.load(banks["plain"])
    good = _good(tiny_mvtec)[:3]
    unit = _unit_batch(good)
    mixed = unit.clone()
    mixed[1] *= 255  # the usual mistake: not dividing by 255
    mixed[2, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning) as caught:
        pred = det.predict(mixed)
    text = " ".join(str(w.message) for w in caught)
    assert "tensor[1]" in text and "divide by 255" in text and "tensor[2]" in text and "NaN" in text
    assert np.isnan(pred.scores[1:]).all() and np.isfinite(pred.scores[0])
    assert_close_across_runs(pred.scores[:1], det.predict(unit[:1]).scores)
    # numpy arrays with the same mistake: the same rule, the same words
    arrays = [np.asarray(unit[i].permute(1, 2, 0)) for i in range(3)]
    with pytest.warns(UserWarning, match="divide by 255"):
        scores = det.predict([arrays[0], arrays[1] * 255]).scores
    assert np.isfinite(scores[0]) and np.isnan(scores[1])
    # partial_fit: nothing enters the bank from the out-of-range image, and it is named
    n_seen = det.bank.n_seen
    with pytest.warns(UserWarning, match="tensor\\[1\\]"):
        det.partial_fit(mixed[:2])
    assert det.bank.n_seen == n_seen + 8 * 8 and det.last_partial_fit_["skipped_files"] == ["tensor[1]"]
    with pytest.warns(UserWarning):
        det.partial_fit([arrays[0], arrays[1] * 255])
    assert det.last_partial_fit_["skipped_files"] == ["images[1]"]  # a position, not the array's repr
