"""SIGTERM (how Docker, Kubernetes, Ray and systemd stop a process) stops build and update like Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ocbank import ClusterBank
from ocbank.cli import EXIT_TERMINATED
from ocbank.jobs.lock import LOCK_NAME
from ocbank.model.features import file_sha256

from .conftest import tiny_config

pytestmark = pytest.mark.slow  # each test starts ocbank in a subprocess


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ocbank.cli", "-q", *args]


def _has_content(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _terminate_when(cmd: list[str], ready: Path) -> subprocess.CompletedProcess:
    """Start ``cmd``, wait until ``ready`` has content (it is working), SIGTERM it at once.

    Content, not mere existence: the lock file exists from ``open`` on, but its holder's pid is
    written only once the lock is held, so a signal before then would test lock acquisition.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not _has_content(ready) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _copies(tiny_mvtec, folder: Path, n: int) -> None:
    """``n`` training images (copies of the tiny set's) in ``folder``: a stream long enough to stop mid-way."""
    folder.mkdir(parents=True)
    pictures = sorted((Path(tiny_mvtec) / "weave" / "train" / "good").glob("*.png"))
    for i in range(n):
        (folder / f"{i:03d}.png").write_bytes(pictures[i % len(pictures)].read_bytes())


def test_sigterm_stops_a_build_like_ctrl_c_and_resume_finishes_it(tmp_path, tiny_mvtec):
    root = tmp_path / "data"
    _copies(tiny_mvtec, root / "weave" / "train" / "good", 40)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(root, data={"batch_size": 2}, bank={"radius": 5.0})))
    out = tmp_path / "banks"
    cmd = _cli("build", "--config", str(cfg), "--out", str(out), "--checkpoint-every", "1")
    done = _terminate_when(cmd, out / "weave.partial.h5")  # stopped after its first checkpoint
    assert done.returncode == EXIT_TERMINATED == 143, done.stderr
    assert "stopped by SIGTERM" in done.stderr and "Traceback" not in done.stderr
    assert not (out / LOCK_NAME).exists()  # released on the way out
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written file
    meta = ClusterBank.load(out / "weave.partial.h5").metadata_  # the last checkpoint is whole
    assert 0 < meta["stream_position"] < meta["n_images"] and not (out / "weave.h5").exists()
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert ClusterBank.load(out / "weave.h5").metadata_["complete"] is True


def test_sigterm_stops_an_update_and_leaves_the_bank_as_it_was(tmp_path, tiny_mvtec):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_mvtec, bank={"radius": 5.0}, data={"classes": ["dots"]})))
    out = tmp_path / "banks"
    assert subprocess.run(_cli("build", "--config", str(cfg), "--out", str(out)), timeout=600).returncode == 0
    bank = out / "dots.h5"
    before = file_sha256(bank)
    _copies(tiny_mvtec, tmp_path / "new", 40)
    cmd = _cli("update", "--bank", str(bank), "--input", str(tmp_path / "new"), "--out", str(bank))
    done = _terminate_when(cmd, out / LOCK_NAME)  # it holds the lock: reading the bank or streaming
    assert done.returncode == EXIT_TERMINATED, done.stderr
    assert "stopped by SIGTERM" in done.stderr and "Traceback" not in done.stderr
    assert file_sha256(bank) == before and not (out / LOCK_NAME).exists()
    assert "lineage" not in ClusterBank.load(bank).metadata_
