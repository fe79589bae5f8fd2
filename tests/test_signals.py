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


def _terminate_once_locked(cmd: list[str], folder: Path, after: float) -> subprocess.CompletedProcess:
    """Start ``cmd``, wait until it holds ``folder``'s lock (it is working), let it run ``after`` s, SIGTERM it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (folder / LOCK_NAME).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(after)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_sigterm_stops_a_build_like_ctrl_c_and_resume_finishes_it(tmp_path, tiny_mvtec):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_mvtec, data={"batch_size": 2}, bank={"radius": 5.0})))
    out = tmp_path / "banks"
    cmd = _cli("build", "--config", str(cfg), "--out", str(out), "--checkpoint-every", "1")
    done = _terminate_once_locked(cmd, out, after=1.0)
    assert done.returncode == EXIT_TERMINATED == 143, done.stderr
    assert "stopped by SIGTERM" in done.stderr and "Traceback" not in done.stderr
    assert not (out / LOCK_NAME).exists()  # released on the way out
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written file
    for bank in out.glob("*.h5"):
        ClusterBank.load(bank)  # every checkpoint or bank left behind is whole
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert {p.name for p in out.glob("*.h5")} == {"dots.h5", "weave.h5"}


def test_sigterm_stops_an_update_and_leaves_the_bank_as_it_was(tmp_path, tiny_mvtec):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_mvtec, bank={"radius": 5.0}, data={"classes": ["dots"]})))
    out = tmp_path / "banks"
    assert subprocess.run(_cli("build", "--config", str(cfg), "--out", str(out)), timeout=600).returncode == 0
    bank = out / "dots.h5"
    before = file_sha256(bank)
    new = tmp_path / "new"
    new.mkdir()
    for i in range(24):  # enough images that the update is still streaming when the signal comes
        src = sorted((Path(tiny_mvtec) / "dots" / "test").rglob("*.png"))[i % 5]
        (new / f"{i:02d}.png").write_bytes(src.read_bytes())
    done = _terminate_once_locked(_cli("update", "--bank", str(bank), "--input", str(new), "--out", str(bank)),
                                  out, after=0.5)
    assert done.returncode == EXIT_TERMINATED, done.stderr
    assert "stopped by SIGTERM" in done.stderr and "Traceback" not in done.stderr
    assert file_sha256(bank) == before and not (out / LOCK_NAME).exists()
    assert "lineage" not in ClusterBank.load(bank).metadata_
