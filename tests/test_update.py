"""Keep learning on the line: ocbank update and Detector.partial_fit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ocbank import ClusterBank, Detector
from ocbank.cli import main
from ocbank.errors import BankChangedError
from ocbank.jobs.lock import build_lock
from ocbank.jobs.update import UpdateJob, update_bank
from ocbank.model.features import file_sha256

from .conftest import assert_close_across_runs, tiny_config

pytestmark = pytest.mark.slow  # every test here builds and updates banks through the backbone

# These banks have a fixed radius far below the patches' spacing (every patch its own centroid), so
# any update grows K in proportion, and thresholds set on one to three images: the gate and the growth
# guard are lifted where a test is about something else (tests/test_learning.py tests them).
UNGUARDED = ("--gate", "off", "--max-new-centroids", "100")


def test_build_on_a_then_update_with_b_equals_one_build_on_a_then_b(tmp_path, tiny_mvtec, caplog):
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
    assert main(["-q", "update", "--bank", str(parent), "--input", str(b_dir), "--out", str(tmp_path / "new.h5"),
                 *UNGUARDED]) == 0
    updated = ClusterBank.load(tmp_path / "new.h5")
    ref = Detector.from_config({**cfg, "device": "cpu"}).fit([str(p) for p in train])
    np.testing.assert_array_equal(updated.counts, ref.bank.counts)
    assert_close_across_runs(updated.means, ref.bank.means)  # B's features in a batch of 2, not 4+2
    lineage = updated.metadata_["lineage"]
    assert lineage == [lineage[0]] and lineage[0]["parent_sha256"] == file_sha256(parent)
    assert lineage[0]["images_added"] == 2 and updated.metadata_["thresholds_predate_update"] is True
    assert "decision" in updated.metadata_  # thresholds kept, flagged as older than the update
    with caplog.at_level("WARNING"):  # whoever scores with them is told, not only the update's caller
        Detector.load(tmp_path / "new.h5")
    assert sum("thresholds_predate_update" in r.getMessage() for r in caplog.records) == 1


def test_update_recalibrates_when_given_images(tmp_path, tiny_mvtec, capsys, caplog):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config(tiny_mvtec, bank={"radius": 5.0})))
    out = tmp_path / "b"
    assert main(["-q", "build", "--config", str(cfg_file), "--out", str(out), "--classes", "dots"]) == 0
    good = Path(tiny_mvtec) / "dots" / "test" / "good"
    assert main(["-q", "update", "--bank", str(out / "dots.h5"), "--input", str(good), "--out", str(out / "dots.h5"),
                 "--calibration", str(good), *UNGUARDED]) == 0
    meta = ClusterBank.load(out / "dots.h5").metadata_
    assert meta["decision"]["source"] == "folder" and meta["decision"]["n_images"] == 3
    assert meta["thresholds_predate_update"] is False and meta["lineage"][0]["recalibrated"] is True
    with caplog.at_level("WARNING"):
        Detector.load(out / "dots.h5")
    assert not any("thresholds_predate_update" in r.getMessage() for r in caplog.records)
    assert json.loads(json.dumps(meta))  # strict JSON


# ---------------------------------------------------------------------- one writer at a time
@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_mvtec) -> dict[str, Path]:
    """A dots bank built by the CLI into its own folder (copied by each test that writes to it)."""
    tmp = tmp_path_factory.mktemp("built")
    cfg = tmp / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_mvtec, bank={"radius": 5.0}, data={"classes": ["dots"]})))
    assert main(["-q", "build", "--config", str(cfg), "--out", str(tmp / "banks")]) == 0
    return {"cfg": cfg, "banks": tmp / "banks"}


def _copy_banks(built: dict[str, Path], dest: Path) -> Path:
    shutil.copytree(built["banks"], dest)
    return dest / "dots.h5"


def _new_images(tiny_mvtec, tmp_path: Path, name: str, which: slice) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for p in sorted((Path(tiny_mvtec) / "dots" / "test" / "good").glob("*.png"))[which]:
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


def test_update_refuses_a_bank_that_changed_under_it_naming_both_digests(built, tiny_mvtec, tmp_path, monkeypatch):
    bank = _copy_banks(built, tmp_path / "banks")
    parent = file_sha256(bank)
    new = _new_images(tiny_mvtec, tmp_path, "new", slice(0, 2))
    real = Detector.partial_fit

    def meanwhile(self, images):  # another writer replaces the bank while this update streams
        other = Detector.load(bank)
        other.lineage_ = [{"images_added": 0, "note": "someone else"}]
        other.save(bank)
        return real(self, images)

    monkeypatch.setattr(Detector, "partial_fit", meanwhile)
    theirs = None
    with pytest.raises(BankChangedError) as caught:
        try:
            update_bank(UpdateJob(str(bank), (str(new),), str(bank), gate="off", max_new_centroids=100))
        finally:
            theirs = file_sha256(bank)
    assert parent in str(caught.value) and theirs in str(caught.value) and parent != theirs
    assert ClusterBank.load(bank).metadata_["lineage"] == [{"images_added": 0, "note": "someone else"}]  # kept


def test_update_takes_the_build_lock_of_the_folder_it_writes(built, tiny_mvtec, tmp_path, capsys):
    bank = _copy_banks(built, tmp_path / "banks")
    before = file_sha256(bank)
    new = _new_images(tiny_mvtec, tmp_path, "new", slice(0, 2))
    with build_lock(bank.parent):  # a build (or another update) is writing this folder
        assert main(["-q", "update", "--bank", str(bank), "--input", str(new), "--out", str(bank), *UNGUARDED]) == 2
    assert "another ocbank build or update" in capsys.readouterr().err and file_sha256(bank) == before


@pytest.mark.slow
def test_two_updates_at_once_never_lose_a_run(built, tiny_mvtec, tmp_path):
    """Each run that reports success is in the bank: the lineage and n_seen count every one of them."""
    bank = _copy_banks(built, tmp_path / "banks")
    n_seen = ClusterBank.load(bank).n_seen
    folders = [_new_images(tiny_mvtec, tmp_path, "a", slice(0, 1)), _new_images(tiny_mvtec, tmp_path, "b", slice(1, 3))]
    runs = [subprocess.Popen([sys.executable, "-m", "ocbank.cli", "-q", "update", "--bank", str(bank), "--input",
                              str(f), "--out", str(bank), *UNGUARDED], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for f in folders]
    results = [(r.wait(timeout=600), r.stderr.read()) for r in runs]
    won = [i for i, (code, _) in enumerate(results) if code == 0]
    assert won, results
    for code, err in results:
        assert code == 0 or (code == 2 and ("another ocbank build or update" in err or "changed while" in err)), err
    updated = ClusterBank.load(bank)
    lineage = updated.metadata_["lineage"]
    assert len(lineage) == len(won)
    assert sorted(e["images_added"] for e in lineage) == sorted([1, 2][i] for i in won)
    assert updated.n_seen == n_seen + 8 * 8 * sum([1, 2][i] for i in won)


def test_build_resume_keeps_a_bank_that_update_extended(built, tiny_mvtec, tmp_path, caplog):
    bank = _copy_banks(built, tmp_path / "banks")
    new = _new_images(tiny_mvtec, tmp_path, "new", slice(0, 2))
    assert main(["-q", "update", "--bank", str(bank), "--input", str(new), "--out", str(bank), *UNGUARDED]) == 0
    after = ClusterBank.load(bank)
    with caplog.at_level("WARNING"):
        assert main(["-q", "build", "--config", str(built["cfg"]), "--out", str(bank.parent), "--resume"]) == 0
    assert "training images changed" not in caplog.text and "extended by 1 update(s)" in caplog.text
    kept = ClusterBank.load(bank)
    assert kept.n_seen == after.n_seen and kept.metadata_["lineage"] == after.metadata_["lineage"]
    summary = json.loads((bank.parent / "build_summary.json").read_text())["classes"]["dots"]
    assert summary["status"] == "complete" and summary["n_centroids"] == len(kept) and summary["updates"] == 1
