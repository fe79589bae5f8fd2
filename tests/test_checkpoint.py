"""HDF5 bank files: round trip, resume, atomic writes and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from ocbank import CheckpointError, ClusterBank
from ocbank.engine import checkpoint as ckpt

from .conftest import clustered


@pytest.fixture
def bank() -> ClusterBank:
    return ClusterBank(16, 2.0).add(clustered(600, 16, 10, 3.0, 0.5, 0))


def test_round_trip_keeps_everything(tmp_path: Path, bank: ClusterBank):
    path = tmp_path / "bank.h5"
    bank.save(path, metadata={"backbone": "wide_resnet50_2", "position": 600})
    loaded = ClusterBank.load(path)
    np.testing.assert_array_equal(loaded.means, bank.means)
    np.testing.assert_array_equal(loaded.counts, bank.counts)
    assert (loaded.radius, loaded.dim, loaded.n_seen) == (2.0, 16, 600)
    np.testing.assert_array_equal(loaded.m2, bank.m2)
    assert loaded.m2.shape == (len(bank),) and (bank.m2 > 0).any() and loaded.spread_known_
    assert loaded.metadata_ == {"backbone": "wide_resnet50_2", "position": 600}
    with h5py.File(path) as f:
        assert f.attrs["format_version"] == 2 and f.attrs["ocbank_version"]
        assert json.loads(f.attrs["metadata"])["position"] == 600


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path: Path):
    X = clustered(2000, 16, 25, 3.0, 0.6, 1)
    whole = ClusterBank(16, 2.0).add(X)
    first = ClusterBank(16, 2.0).add(X[:777])
    first.save(tmp_path / "half.h5")
    resumed = ClusterBank.load(tmp_path / "half.h5").add(X[777:])
    np.testing.assert_array_equal(resumed.counts, whole.counts)
    np.testing.assert_allclose(resumed.means, whole.means, atol=1e-5)


def test_empty_bank_round_trips(tmp_path: Path):
    ClusterBank(8, 1.0).save(tmp_path / "e.h5")
    loaded = ClusterBank.load(tmp_path / "e.h5")
    assert len(loaded) == 0 and loaded.dim == 8


def test_crash_during_save_keeps_previous_file(tmp_path: Path, bank: ClusterBank, monkeypatch):
    path = tmp_path / "bank.h5"
    bank.save(path)
    good = path.read_bytes()
    bigger = ClusterBank(16, 2.0).add(clustered(900, 16, 30, 3.0, 0.5, 2))

    real_create = h5py.Group.create_dataset

    def crash(self, name, *args, **kwargs):
        if name == "counts":
            raise KeyboardInterrupt("power cut")
        return real_create(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        bigger.save(path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.h5"]  # no temp file left


def _rewrite(path: Path, edit) -> None:
    with h5py.File(path, "r+") as f:
        edit(f)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda f: f.__delitem__("counts"), "'counts' is missing"),
        (lambda f: f.attrs.__setitem__("format_version", 99), "unknown bank format version 99"),
        (lambda f: f.attrs.__setitem__("format", "something else"), "not an ocbank bank file"),
        (lambda f: f["counts"].__setitem__(0, 0), "counts must all be >= 1"),
        (lambda f: f["means"].__setitem__((0, 0), np.nan), "NaN or inf"),
        (lambda f: f["means"].__setitem__((0, 0), 123.0), "checksum mismatch"),
        (lambda f: f.attrs.__setitem__("n_seen", 5), "does not match the sum of counts"),
        (lambda f: f.attrs.__setitem__("dim", 17), "means must be float32 [K, 17]"),
    ],
)
def test_damaged_files_are_refused(tmp_path: Path, bank: ClusterBank, edit, words):
    path = tmp_path / "bank.h5"
    bank.save(path)
    _rewrite(path, edit)
    with pytest.raises(CheckpointError) as info:
        ClusterBank.load(path)
    assert words in str(info.value) and str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_wrong_dtypes_are_refused(tmp_path: Path, bank: ClusterBank):
    path = tmp_path / "bank.h5"
    bank.save(path)

    def to_float64(f):
        data = f["means"][()]
        del f["means"]
        f.create_dataset("means", data=data.astype(np.float64))

    _rewrite(path, to_float64)
    with pytest.raises(CheckpointError, match="means must be float32"):
        ClusterBank.load(path)


@pytest.mark.parametrize("keep", [0.95, 0.5, 0.1])
def test_truncated_file_never_loads(tmp_path: Path, bank: ClusterBank, keep: float):
    path = tmp_path / "bank.h5"
    bank.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=str(path.name)):
        ClusterBank.load(path)


def test_foreign_and_missing_files_are_refused(tmp_path: Path):
    text = tmp_path / "notes.h5"
    text.write_text("this is not HDF5")
    with pytest.raises(CheckpointError, match="not a readable HDF5"):
        ClusterBank.load(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(CheckpointError, match="not an ocbank bank file"):
        ClusterBank.load(other)
    with pytest.raises(CheckpointError, match="no such bank file"):
        ClusterBank.load(tmp_path / "missing.h5")


def test_metadata_must_be_json(tmp_path: Path, bank: ClusterBank):
    with pytest.raises(ValueError, match="JSON"):
        bank.save(tmp_path / "b.h5", metadata={"bad": object()})
    assert not (tmp_path / "b.h5").exists()


def test_read_metadata_helper(tmp_path: Path, bank: ClusterBank):
    bank.save(tmp_path / "b.h5", metadata={"stream_position": 12})
    assert ckpt.read_metadata(tmp_path / "b.h5") == {"stream_position": 12}
