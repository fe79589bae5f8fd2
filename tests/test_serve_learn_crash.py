"""Crashes mid-learn: SIGKILL of the learn task, then of the whole service. The bank stays whole,
the feedback stays in place, and the next learn absorbs every image exactly once.

Bounded in count and time; skipped where the ``serve`` extra is absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")
pytest.importorskip("psutil")

from tests.serve_helpers import Client, kill_tree, start_server, stop_server  # noqa: E402

pytestmark = pytest.mark.slow

TOKEN = "crash-test-token-0123456789abcdef"
RUNNING_WAIT_S = 120.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ocbank.model.detector import Detector
    from ocbank.synthetic import make_dataset

    root = make_dataset(tmp_path_factory.mktemp("data"), n_train=30, n_good_test=12, n_defect_test=1, size=80)
    banks = tmp_path_factory.mktemp("banks")
    train = sorted((root / "weave" / "train" / "good").glob("*.png"))
    Detector(weights="none", image_size=64, resize=72, radius="auto", radius_images=3, device="cpu", batch_size=4,
             false_alarm_rate=0.05).fit(train[:10]).calibrate(train[10:]).save(banks / "weave.h5")
    token = tmp_path_factory.mktemp("secret") / "admin.token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    good = sorted((root / "weave" / "test" / "good").glob("*.png"))
    return {"banks": banks, "token": token, "good": good, "log": tmp_path_factory.mktemp("log") / "serve.log",
            "built": hashlib.sha256((banks / "weave.h5").read_bytes()).hexdigest()}


def _journal(banks: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((banks / "feedback" / "weave" / "learn.json").read_text())
    return {}


def _wait_running(banks: Path, previous_pid: int | None = None) -> dict:
    """The journal of a learn that has started its update (state running, a new pid)."""
    deadline = time.monotonic() + RUNNING_WAIT_S
    while time.monotonic() < deadline:
        journal = _journal(banks)
        if journal.get("state") == "running" and journal.get("pid") != previous_pid:
            return journal
        time.sleep(0.05)
    raise AssertionError(f"no learn reached its update within {RUNNING_WAIT_S} s: {_journal(banks)}")


def _send(client: Client, files: list[Path]) -> set[str]:
    ids = set()
    for f in files:
        status, answer, _ = client.call("POST", "/v1/banks/weave/feedback?label=OK", f.read_bytes())
        assert status == 202, answer
        ids.add(answer["id"])
    return ids


def _check_whole(setup, ids: set[str]) -> None:
    """The bank reads and validates; every feedback image and sidecar is in place."""
    from ocbank.engine.checkpoint import read_bank

    read_bank(setup["banks"] / "weave.h5")
    folder = setup["banks"] / "feedback" / "weave"
    for fid in ids:
        assert (folder / f"{fid}.png").is_file() and (folder / f"{fid}.json").is_file(), fid


def _check_exactly_once(setup, ids: set[str]) -> None:
    """Every id settled once; the bank's lineage since the build added exactly the absorbed ones."""
    from ocbank.engine.checkpoint import read_metadata

    sidecars = [json.loads((setup["banks"] / "feedback" / "weave" / f"{fid}.json").read_text()) for fid in ids]
    absorbed = [s for s in sidecars if s["absorbed_into"]]
    assert all(bool(s["absorbed_into"]) != bool(s["held_back"]) for s in sidecars), sidecars
    lineage = read_metadata(setup["banks"] / "weave.h5").get("lineage") or []
    assert sum(e["images_added"] for e in lineage) == len(absorbed), lineage
    assert len(absorbed) > 0


def test_sigkill_of_the_learn_task_then_of_the_server(setup):
    banks = setup["banks"]
    server = start_server(banks, setup["log"], setup["token"])
    try:
        client = Client(server["port"], TOKEN)
        # Without --inspect-token-file, inspection is open.
        assert client.call("POST", "/v1/inspect/weave", setup["good"][0].read_bytes(), token=None)[0] == 200
        ids = _send(client, setup["good"][:6])
        assert client.call("POST", "/v1/banks/weave/learn")[0] == 202
        journal = _wait_running(banks)
        os.kill(journal["pid"], signal.SIGKILL)  # the learn task, mid-update
        report = client.wait_learn("weave", 120)
        assert report["state"] == "failed" and report["error"], report
        _check_whole(setup, ids)
        # The next learn finishes or redoes the killed one, then learns the rest; nothing twice.
        ids |= _send(client, setup["good"][6:8])
        assert client.call("POST", "/v1/banks/weave/learn")[0] == 202
        report = client.wait_learn("weave")
        assert report["state"] == "succeeded", report
        _check_exactly_once(setup, ids)

        # Now the whole service dies mid-learn.
        more = _send(client, setup["good"][8:12])
        ids |= more
        before = hashlib.sha256((banks / "weave.h5").read_bytes()).hexdigest()
        assert client.call("POST", "/v1/banks/weave/learn")[0] == 202
        _wait_running(banks, previous_pid=journal["pid"])
        kill_tree(server)
    finally:
        stop_server(server)
    _check_whole(setup, ids)
    after = hashlib.sha256((banks / "weave.h5").read_bytes()).hexdigest()
    assert after == before or after != setup["built"]  # the old bank, or the learn's new one: never a torn file
    server = start_server(banks, setup["log"], setup["token"])
    try:
        client = Client(server["port"], TOKEN)
        assert client.call("GET", "/v1/banks/weave/learn")[1]["state"] == "interrupted"
        assert client.call("POST", "/v1/banks/weave/learn")[0] == 202
        report = client.wait_learn("weave")
        assert report["state"] == "succeeded", report
        _check_exactly_once(setup, ids)
        served = client.call("GET", "/v1/banks")[1]["banks"]["weave"]["bank_sha256"]
        assert served == hashlib.sha256((banks / "weave.h5").read_bytes()).hexdigest()
    finally:
        stop_server(server)
