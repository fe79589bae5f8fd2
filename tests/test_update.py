"""Keep learning on the line: ocbank update and Detector.partial_fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from ocbank import ClusterBank, Detector
from ocbank.cli import main
from ocbank.model.features import file_sha256

from .conftest import assert_close_across_runs, tiny_config


def test_build_on_a_then_update_with_b_equals_one_build_on_a_then_b(tmp_path, tiny_mvtec):
    train = sorted((Path(tiny_mvtec) / "weave" / "train" / "good").glob("*.png"))
    a_dir, b_dir = tmp_path / "data_a" / "weave" / "train" / "good", tmp_path / "new"
    a_dir.mkdir(parents=True)
    b_dir.mkdir()
    for p in train[:4]:
        (a_dir / p.name).symlink_to(p)
    for p in train[4:]:
        (b_dir / p.name).symlink_to(p)
    # radius fixed, no hold-out: the stream is exactly A then B
    cfg = tiny_config(tmp_path / "data_a", bank={"radius": 5.0}, decision={"holdout": 0.1})
    cfg_file = tmp_path / "a.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "banks"
    assert main(["-q", "build", "--config", str(cfg_file), "--out", str(out), "--calibration", str(b_dir)]) == 0
    parent = out / "weave.h5"
    assert main(["-q", "update", "--bank", str(parent), "--input", str(b_dir), "--out", str(tmp_path / "new.h5")]) == 0
    updated = ClusterBank.load(tmp_path / "new.h5")
    ref = Detector.from_config({**cfg, "device": "cpu"}).fit([str(p) for p in train])
    np.testing.assert_array_equal(updated.counts, ref.bank.counts)
    assert_close_across_runs(updated.means, ref.bank.means)  # B's features in a batch of 2, not 4+2
    lineage = updated.metadata_["lineage"]
    assert lineage == [lineage[0]] and lineage[0]["parent_sha256"] == file_sha256(parent)
    assert lineage[0]["images_added"] == 2 and updated.metadata_["thresholds_predate_update"] is True
    assert "decision" in updated.metadata_  # thresholds kept, flagged as older than the update


def test_update_recalibrates_when_given_images(tmp_path, tiny_mvtec, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config(tiny_mvtec, bank={"radius": 5.0})))
    out = tmp_path / "b"
    assert main(["-q", "build", "--config", str(cfg_file), "--out", str(out), "--classes", "dots"]) == 0
    good = Path(tiny_mvtec) / "dots" / "test" / "good"
    assert main(["-q", "update", "--bank", str(out / "dots.h5"), "--input", str(good), "--out", str(out / "dots.h5"),
                 "--calibration", str(good)]) == 0
    meta = ClusterBank.load(out / "dots.h5").metadata_
    assert meta["decision"]["source"] == "folder" and meta["decision"]["n_images"] == 3
    assert meta["thresholds_predate_update"] is False and meta["lineage"][0]["recalibrated"] is True
    assert json.loads(json.dumps(meta))  # strict JSON
