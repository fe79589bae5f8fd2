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
    np.testing.assert_allclose(resumed.m2, whole.m2, rtol=1e-6, atol=1e-4)
    assert resumed.spread_known_


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


# ---------------------------------------------------------------------- save checks
@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda b: b.store_._counts.__setitem__(0, 0), "counts must all be >= 1"),
        (lambda b: setattr(b, "n_seen_", b.n_seen + 1), "does not match the sum of counts"),
        (lambda b: b.store_._means.__setitem__((1, 2), np.inf), "NaN or inf"),
        (lambda b: b.store_._m2.__setitem__(0, np.nan), "m2 must be finite"),
        (lambda b: b.store_._m2.__setitem__(0, -1.0), "m2 must be finite and >= 0"),
        (lambda b: setattr(b, "radius_", float("inf")), "radius must be finite"),
    ],
)
def test_save_refuses_an_inconsistent_bank_and_writes_nothing(tmp_path: Path, bank: ClusterBank, damage, words):
    path = tmp_path / "bank.h5"
    bank.save(path)
    good = path.read_bytes()
    damage(bank)
    with pytest.raises(CheckpointError, match=words) as info:
        bank.save(path)
    assert "Nothing was written" in str(info.value)
    assert path.read_bytes() == good
    with pytest.raises(CheckpointError):
        bank.save(tmp_path / "new.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.h5"]


# ---------------------------------------------------------------------- version 2
@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda f: f.__delitem__("m2"), "'m2' is missing"),
        (lambda f: f["m2"].__setitem__(0, np.nan), "m2 must be finite"),
        (lambda f: f["m2"].__setitem__(0, -2.0), "m2 must be finite and >= 0"),
        (lambda f: f["m2"].__setitem__(0, 1234.5), "checksum mismatch"),
        (lambda f: f.attrs.__setitem__("radius_history", "not json"), "not valid JSON"),
        (lambda f: f.attrs.__setitem__("radius_history", "[1, 2]"), "radius_history must be a JSON list"),
        (lambda f: f.attrs.__setitem__("max_centroids", 1), "max_centroids=1"),
        (lambda f: f.attrs.__setitem__("max_centroids", 5), "more than its max_centroids=5"),
        (lambda f: f.attrs.__delitem__("spread_known"), "missing field"),
    ],
)
def test_damaged_version_2_fields_are_refused(tmp_path: Path, bank: ClusterBank, edit, words):
    path = tmp_path / "bank.h5"
    bank.save(path)
    _rewrite(path, edit)
    with pytest.raises(CheckpointError, match=words):
        ClusterBank.load(path)


def write_version_1(path: Path, bank: ClusterBank) -> None:
    """A file exactly as ocbank wrote format version 1 (no m2, no cap attributes)."""
    import hashlib

    h = hashlib.sha256()
    h.update(np.ascontiguousarray(bank.means, dtype="<f4").tobytes())
    h.update(np.ascontiguousarray(bank.counts, dtype="<i8").tobytes())
    with h5py.File(path, "w") as f:
        f.create_dataset("means", data=np.asarray(bank.means))
        f.create_dataset("counts", data=np.asarray(bank.counts))
        f.attrs.update({"format": "ocbank.ClusterBank", "format_version": 1, "ocbank_version": "0.1.0",
                        "radius": bank.radius, "dim": bank.dim, "n_seen": bank.n_seen,
                        "metadata": json.dumps({"old": True}), "sha256": h.hexdigest()})


def test_version_1_files_load_with_unknown_spread_and_save_as_version_2(tmp_path: Path, bank: ClusterBank):
    v1 = tmp_path / "v1.h5"
    write_version_1(v1, bank)
    old = ClusterBank.load(v1)
    np.testing.assert_array_equal(old.means, bank.means)
    np.testing.assert_array_equal(old.counts, bank.counts)
    assert old.metadata_ == {"old": True} and old.n_seen == bank.n_seen
    assert not old.spread_known_ and (old.m2 == 0).all() and np.isnan(old.spread).all()
    old.add(clustered(100, 16, 10, 3.0, 0.5, 5))  # m2 grows, but stays partial
    assert not old.spread_known_ and np.isnan(old.spread).all()
    old.save(tmp_path / "v2.h5")
    again = ClusterBank.load(tmp_path / "v2.h5")
    assert not again.spread_known_
    np.testing.assert_array_equal(again.m2, old.m2)
    with h5py.File(tmp_path / "v2.h5") as f:
        assert f.attrs["format_version"] == 2 and not f.attrs["spread_known"]
    # Merging an unknown-spread bank makes the result's spread unknown too.
    fresh = ClusterBank(16, 2.0).add(clustered(50, 16, 10, 3.0, 0.5, 6))
    assert fresh.spread_known_ and not fresh.merge(again).spread_known_


def test_bank_state_without_m2_means_unknown_spread():
    state = ckpt.BankState(np.zeros((1, 4), np.float32), np.array([3]), 1.0, 4, 3)
    bank = ClusterBank.from_state(state)
    assert not bank.spread_known_ and bank.m2.tolist() == [0.0]


# ---------------------------------------------------------------------- temp files
def dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_files_of_dead_writers_are_removed_before_writing(tmp_path: Path, bank: ClusterBank):
    import os

    host = ckpt._host()
    dead = tmp_path / f".bank.h5.{host}.{dead_pid()}.abc123.h5.tmp"
    live = tmp_path / f".bank.h5.{host}.{os.getpid()}.def456.h5.tmp"
    other_host = tmp_path / f".bank.h5.elsewhere-{host}.{dead_pid()}.x1.h5.tmp"
    other_file = tmp_path / f".other.h5.{host}.{dead_pid()}.x2.h5.tmp"
    for p in (dead, live, other_host, other_file):
        p.write_bytes(b"partial")
    bank.save(tmp_path / "bank.h5")
    assert not dead.exists()
    assert live.exists() and other_host.exists() and other_file.exists()
    assert ClusterBank.load(tmp_path / "bank.h5").n_seen == bank.n_seen


def test_temp_file_name_carries_host_and_pid(tmp_path: Path, monkeypatch):
    import os

    names = []

    def write(tmp: str) -> None:
        names.append(Path(tmp).name)
        Path(tmp).write_bytes(b"x")

    ckpt.atomic_write(tmp_path / "f.bin", write, suffix=".tmp")
    assert names[0].startswith(f".f.bin.{ckpt._host()}.{os.getpid()}.") and names[0].endswith(".tmp")


def test_a_sigkilled_save_leaves_a_temp_file_that_the_next_save_removes(tmp_path: Path, bank: ClusterBank):
    import signal
    import subprocess
    import sys

    code = (
        "import sys, time\n"
        "from ocbank.engine.checkpoint import atomic_write\n"
        "def write(tmp):\n"
        "    open(tmp, 'wb').write(b'half a bank')\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "atomic_write(sys.argv[1], write, suffix='.h5.tmp')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "bank.h5")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].endswith(".h5.tmp") and f".{proc.pid}." in left[0]
    bank.save(tmp_path / "bank.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.h5"]


def test_saved_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    import os
    import stat

    for mask in (0o022, 0o077):
        old = os.umask(mask)
        try:
            ClusterBank(4, 1.0).add(np.eye(4, dtype=np.float32)).save(tmp_path / f"b{mask}.h5")
            (tmp_path / f"plain{mask}").write_text("x")  # what a plain open() gives under this umask
        finally:
            os.umask(old)
        mode = stat.S_IMODE((tmp_path / f"b{mask}.h5").stat().st_mode)
        assert mode == stat.S_IMODE((tmp_path / f"plain{mask}").stat().st_mode) == 0o666 & ~mask


def test_bank_file_names_have_one_home(tmp_path):
    final, partial = ckpt.bank_file_path(tmp_path, "a.b"), ckpt.bank_file_path(tmp_path, "a.b", partial=True)
    assert (final.name, partial.name) == ("a.b.h5", "a.b.partial.h5") and final.parent == partial.parent == tmp_path
    assert ckpt.is_checkpoint_name(partial) and not ckpt.is_checkpoint_name(final)
    assert final.name.endswith(ckpt.BANK_SUFFIX) and partial.name.endswith(ckpt.PARTIAL_SUFFIX)
