"""The bank record: one typed reading of a bank file, one way to open it, and every key kept on save.

``data/bank_format2_updated.h5`` was written before the record existed (``ocbank build`` on a
synthetic ``weave`` class at 32 px with ``weights: none``, ``radius_images: 3``, ``max_centroids: 8``
and a 1/3 holdout, then ``ocbank update`` with its three good test images), so it carries every
key a build and an update write, the stale-threshold flag included.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ocbank.engine.checkpoint import bank_file_path, read_bank, read_metadata, write_bank
from ocbank.engine.cpu_search import CHOICE_ENV
from ocbank.errors import CheckpointError
from ocbank.model.detector import Detector
from ocbank.model.progress import FitProgress
from ocbank.model.record import DESCRIBED_KEYS, BankRecord, BuildIdentity, open_bank, read_record

OLD_BANK = Path(__file__).parent / "data" / "bank_format2_updated.h5"
# What the previous format's code (Detector.load(OLD_BANK).predict) gave for _probe().
OLD_SCORES = [116.60114288330078, 121.59104919433594]
OLD_MAP_MAX = [115.01830291748047, 119.93091583251953]


@pytest.fixture(autouse=True)
def _search_as_the_file_was_written(monkeypatch):
    """The file records the CPU search that wrote it (faiss); a save records this run's, so run the same."""
    monkeypatch.setenv(CHOICE_ENV, "faiss")


def _probe() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_a_bank_written_by_the_previous_format_loads_and_scores_as_it_did(caplog):
    with caplog.at_level("WARNING"):
        det = Detector.load(OLD_BANK)
    assert sum("thresholds_predate_update" in r.getMessage() for r in caplog.records) == 1
    pred = det.predict(_probe())
    np.testing.assert_allclose(pred.scores, OLD_SCORES, rtol=1e-4)
    np.testing.assert_allclose(pred.maps.max(axis=(1, 2)), OLD_MAP_MAX, rtol=1e-4)
    record = det.record()
    assert record.build.class_name == "weave" and record.build.complete is True
    assert record.build.stream_position == 3 and record.build.progress == FitProgress(3, (), record.build.progress.seconds)
    assert record.thresholds_predate_update is True and len(record.lineage) == 1
    assert record.decision is not None and record.decision.source == "holdout"
    assert record.radius_stats is not None and record.radius_stats.n_images == 3
    assert det.bank.radius_ > record.radius_stats.suggested  # the cap grew it; the rule's value is kept apart


def test_load_then_save_keeps_every_key_and_value(tmp_path):
    """Detector.load(b).save(c): the metadata of c is the metadata of b, key for key (issue 23 item 10)."""
    Detector.load(OLD_BANK).save(tmp_path / "again.h5")
    before, after = read_metadata(OLD_BANK), read_metadata(tmp_path / "again.h5")
    assert sorted(after) == sorted(before)
    _assert_same_metadata(after, before)
    assert read_bank(tmp_path / "again.h5").radius_history == read_bank(OLD_BANK).radius_history


def _assert_same_metadata(after: dict, before: dict) -> None:
    """Every key and value alike, except that a config written by an older ocbank gains the newer
    settings' defaults: each setting it had keeps its value."""
    assert {k: v for k, v in after.items() if k != "config"} == {k: v for k, v in before.items() if k != "config"}
    for section, values in before["config"].items():
        if isinstance(values, dict):
            assert {k: after["config"][section][k] for k in values} == values, section
        else:
            assert after["config"][section] == values, section


def test_the_record_round_trips_and_carries_keys_it_does_not_know():
    meta = {**read_metadata(OLD_BANK), "a_future_key": {"x": [1, 2]}}
    record = BankRecord.from_metadata(meta, "m")
    assert record.other == {"a_future_key": {"x": [1, 2]}}
    again = record.to_metadata()
    _assert_same_metadata(again, {k: v for k, v in meta.items() if k not in DESCRIBED_KEYS})
    assert BankRecord.from_metadata(again, "m") == record


def test_a_build_identity_writes_only_what_it_knows():
    assert BuildIdentity().to_dict() == {}
    ident = BuildIdentity(class_name="weave", complete=False, progress=FitProgress(2, ("x.png",), 1.5))
    assert ident.to_dict() == {"class": "weave", "complete": False, "progress": FitProgress(2, ("x.png",), 1.5).to_dict()}
    assert BuildIdentity.from_dict(ident.to_dict()) == ident


def _with_metadata(tmp_path: Path, name: str, **changes) -> Path:
    state = read_bank(OLD_BANK)
    state.metadata = {**state.metadata, **changes}
    path = tmp_path / name
    write_bank(path, state)
    return path


def test_a_partial_decision_block_and_unknown_keys_survive_load_and_save(tmp_path):
    path = _with_metadata(tmp_path, "b.h5", decision={"image_threshold": 2.0, "pixel_threshold": 1.0},
                          written_by_a_newer_ocbank=[1, {"x": None}])
    Detector.load(path).save(tmp_path / "c.h5")
    before, after = read_metadata(path), read_metadata(tmp_path / "c.h5")
    _assert_same_metadata({k: v for k, v in after.items() if k != "decision"},
                          {k: v for k, v in before.items() if k != "decision"})
    # The block's keys come back as they were (plus the one field with a default, its normalization rule).
    assert after["decision"] == {**before["decision"], "normalization": "score / image_threshold"}


@pytest.mark.parametrize("how", ["complete: false", "named .partial.h5"])
def test_one_unfinished_checkpoint_rule_for_every_reader(tmp_path, how):
    """open_bank refuses an unfinished checkpoint whichever way it is marked, with one error, for every reader."""
    from ocbank.jobs.update import UpdateJob, update_bank
    from ocbank.serve.banks import validate_bank

    if how == "complete: false":
        path = _with_metadata(tmp_path, "w.h5", complete=False, stream_position=2)
    else:
        path = bank_file_path(tmp_path, "w", partial=True)
        shutil.copy(OLD_BANK, path)
    for read in (lambda: open_bank(path), lambda: Detector.load(path),
                 lambda: update_bank(UpdateJob(str(path), (str(path),), str(tmp_path / "out.h5")))):
        with pytest.raises(CheckpointError, match="unfinished build checkpoint"):
            read()
    if how == "complete: false":  # served files are named by product, never .partial
        with pytest.raises(CheckpointError, match="unfinished build checkpoint"):
            validate_bank("w", path.read_bytes(), str(path))
    assert open_bank(path, allow_partial=True).unfinished
    assert not open_bank(OLD_BANK).unfinished


class _CountingFile:
    """h5py.File, counting opens by mode."""

    opened: list[str] = []

    def __new__(cls, name, mode="r", *args, **kwargs):
        cls.opened.append(mode)
        return _CountingFile.real(name, mode, *args, **kwargs)


@pytest.fixture
def h5_opens(monkeypatch):
    import h5py

    _CountingFile.real = h5py.File
    _CountingFile.opened = []
    monkeypatch.setattr(h5py, "File", _CountingFile)
    return _CountingFile.opened


def test_a_served_bank_is_read_once_per_load(h5_opens):
    from ocbank.serve.banks import validate_bank
    from ocbank.serve.runtime import ServedBank

    data = OLD_BANK.read_bytes()
    info = validate_bank("weave", data, str(OLD_BANK))  # the ingress
    assert h5_opens == ["r"] and info.decision is not None and info.decision["source"] == "holdout"
    h5_opens.clear()
    extractors: dict = {}
    served = ServedBank.load(OLD_BANK, info.sha256, "torch", threads=1, batch=4, device="cpu", extractors=extractors)
    assert h5_opens == ["r"]  # the replica
    assert served.detector.config.data.batch_size == 4  # a whole served batch in one backbone call
    assert served.decision is not None and served.decision.image_threshold == info.decision["image_threshold"]


def test_onnxruntime_banks_share_one_backbone_and_read_their_file_once(h5_opens, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from ocbank.serve.runtime import ServedBank

    other = tmp_path / "other.h5"
    shutil.copy(OLD_BANK, other)
    extractors: dict = {}
    first = ServedBank.load(OLD_BANK, "a", "onnxruntime", threads=1, batch=2, device="cpu", extractors=extractors)
    assert h5_opens == ["r"] and first.runtime.name == "onnxruntime"
    second = ServedBank.load(other, "b", "onnxruntime", threads=1, batch=2, device="cpu", extractors=extractors)
    assert h5_opens == ["r", "r"]
    assert len(extractors) == 1 and second.detector.extractor is first.detector.extractor
    pixels = (_probe().permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    scores, _ = second.runtime(pixels)
    ref = Detector.load(OLD_BANK).predict(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255).scores
    np.testing.assert_allclose(scores, ref, rtol=1e-4)


def test_anomalib_from_bank_to_bank_keeps_every_key_and_value(tmp_path):
    """OCBank.from_bank(b).to_bank(c), and through the Lightning checkpoint's extras: c's metadata is b's."""
    pytest.importorskip("anomalib")
    from ocbank.integrations.anomalib import OCBank

    model = OCBank.from_bank(OLD_BANK, visualizer=False)
    model.to_bank(tmp_path / "c.h5")
    before = read_metadata(OLD_BANK)
    _assert_same_metadata(read_metadata(tmp_path / "c.h5"), before)
    model.model.checkpoint_extras = model.model.extras()  # what on_save/on_load_checkpoint carry
    model.model.restore_bank()
    model.to_bank(tmp_path / "d.h5")
    _assert_same_metadata(read_metadata(tmp_path / "d.h5"), before)


PACKAGE = Path(__file__).resolve().parents[1] / "ocbank"
# The file format's own module, and the record's: the only places raw metadata is read.
METADATA_READERS = {Path("engine/checkpoint.py"), Path("model/record.py")}


def _reads_raw_metadata(source: str) -> list[int]:
    """Lines that name ``read_metadata`` (a call, an attribute, or an import of it, aliased or not)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if isinstance(node, ast.ImportFrom):
            name = next((a.name for a in node.names if a.name == "read_metadata"), None)
        if name == "read_metadata":
            lines.append(node.lineno)
    return lines


def test_no_module_outside_the_record_reads_raw_metadata():
    # the check itself catches each way of reaching read_metadata
    assert _reads_raw_metadata("from ..engine.checkpoint import read_metadata as rm\nrm(p)") == [1]
    assert _reads_raw_metadata("from ..engine import checkpoint\ncheckpoint.read_metadata(p)") == [2]
    assert _reads_raw_metadata("read_bank(p).metadata") == []
    bad = [f"{path.relative_to(PACKAGE)}:{line}"
           for path in sorted(PACKAGE.rglob("*.py")) if path.relative_to(PACKAGE) not in METADATA_READERS
           for line in _reads_raw_metadata(path.read_text())]
    assert not bad, f"raw bank metadata read outside ocbank/model/record.py (use read_record / open_bank): {bad}"


def test_read_record_reads_lineage_summary_and_flag_without_the_scoring_checks(tmp_path):
    record = read_record(OLD_BANK)
    meta = read_metadata(OLD_BANK)
    assert record.last_update == meta["lineage"][-1]
    assert record.build.summary == meta["summary"]
    assert record.thresholds_predate_update is meta["thresholds_predate_update"]
    # an unfinished checkpoint is listed, not refused (open_bank refuses it)
    path = _with_metadata(tmp_path, "p.h5", complete=False)
    assert read_record(path).build.complete is False
    with pytest.raises(CheckpointError, match="unfinished"):
        open_bank(path)
