"""The learning loop over loopback HTTP, one server (admin and inspect tokens) for the module, tests in file order:
auth, feedback, learning under load, versions and rollback, drift, and no token in any log.

Every loop is bounded in count and time. Skipped where the ``serve`` extra is absent.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")
pytest.importorskip("psutil")

from tests.serve_helpers import REPO, Client, session_dirs, start_server, stop_server  # noqa: E402

pytestmark = pytest.mark.slow

TOKEN = "admin-5f0c1d2e3b4a69788796a5b4c3d2e1f0"
WRONG = "wrong-00112233445566778899aabbccddeeff"
INSPECT = "inspect-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
FALSE_ALARM_RATE = 0.05
N_CALIBRATION = 20
LOAD_CLIENTS = 3
LOAD_LIMIT_S = 400.0  # the inspecting clients stop by then whatever happens


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Banks weave and drift (the same calibrated bank, 20 calibration images), a running server with a token."""
    from ocbank.model.detector import Detector
    from ocbank.synthetic import make_dataset

    root = make_dataset(tmp_path_factory.mktemp("data"), n_train=10 + N_CALIBRATION, n_good_test=12,
                        n_defect_test=6, size=80)
    banks = tmp_path_factory.mktemp("banks")
    train = sorted((root / "weave" / "train" / "good").glob("*.png"))
    calibration = tmp_path_factory.mktemp("calibration")
    for f in train[10:]:
        shutil.copy(f, calibration / f.name)
    Detector(weights="none", image_size=64, resize=72, radius="auto", radius_images=3, device="cpu", batch_size=4,
             false_alarm_rate=FALSE_ALARM_RATE).fit(train[:10]).calibrate(train[10:]).save(banks / "weave.h5")
    shutil.copy(banks / "weave.h5", banks / "drift.h5")
    token_file = tmp_path_factory.mktemp("secret") / "admin.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    inspect_file = token_file.with_name("inspect.token")
    inspect_file.write_text(INSPECT)
    inspect_file.chmod(0o600)
    server = start_server(banks, tmp_path_factory.mktemp("log") / "serve.log", token_file,
                          ("--inspect-token-file", str(inspect_file)))
    info = {**server, "client": Client(server["port"], TOKEN), "banks": banks, "root": root,
            "calibration": calibration, "original": _sha(banks / "weave.h5")}
    try:
        yield info
    finally:
        stop_server(server)


def _images(served, kind: str) -> list[Path]:
    return sorted((served["root"] / "weave" / "test" / kind).glob("*.png"))


def _sidecars(served, product: str) -> dict[str, dict]:
    folder = served["banks"] / "feedback" / product
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json") if p.name != "learn.json"}


def _log(served) -> str:
    served["log"].flush()
    return Path(served["log_path"]).read_text()


def _terminal_line(served, text: str, limit_s: float = 30.0) -> str:
    """The serve terminal's line containing ``text`` (the server prints them as it polls, twice a second)."""
    deadline = time.monotonic() + limit_s
    while True:
        found = [x for x in _log(served).splitlines() if text in x]
        if found or time.monotonic() > deadline:
            assert found, f"no line with {text!r} in the serve terminal within {limit_s} s"
            return found[-1]
        time.sleep(0.25)


# ---------------------------------------------------------------------- auth
MUTATING = [
    ("POST", "/v1/banks/weave/reload"),
    ("POST", "/v1/banks/weave/feedback?label=OK"),
    ("POST", "/v1/banks/weave/learn"),
    ("POST", "/v1/banks/weave/rollback?to=0123456789ab"),
]


def test_every_mutating_endpoint_needs_the_token(served):
    c = served["client"]
    body = _images(served, "good")[0].read_bytes()
    before = _sha(served["banks"] / "weave.h5")
    for method, path in MUTATING:
        for token in (None, WRONG, f"{TOKEN}x"):
            status, answer, headers = c.call(method, path, body, token=token)
            assert status == 401, (path, token, answer)
            assert answer["error"]["code"] == "unauthorized" and headers["www-authenticate"] == "Bearer"
            assert TOKEN not in json.dumps(answer) and WRONG not in json.dumps(answer)
    assert not (served["banks"] / "feedback").exists()  # nothing was stored
    assert c.call("GET", "/v1/banks/weave/learn")[1]["state"] == "none"  # nothing was learnt
    assert _sha(served["banks"] / "weave.h5") == before
    # With the token: reload and feedback here; learn and rollback in the tests below.
    status, answer, _ = c.call("POST", "/v1/banks/weave/reload")
    assert status == 200 and answer["changed"] is False
    # Inspection takes its own token (or the admin one); reading stays open.
    for token, code in ((None, 401), (WRONG, 401), (INSPECT, 200), (TOKEN, 200)):
        status, answer, _ = c.call("POST", "/v1/inspect/weave", body, token=token)
        assert status == code, (token, answer)
    status, answer, _ = c.call("POST", "/v1/banks/weave/reload", token=INSPECT)  # not an admin token
    assert status == 401, answer
    assert c.call("GET", "/v1/banks/weave/versions", token=None)[0] == 200
    assert c.call("GET", "/v1/banks", token=None)[0] == 200


def test_feedback_is_kept_once_per_image(served):
    c = served["client"]
    image = _images(served, "good")[0]
    status, first, _ = c.call("POST", "/v1/banks/weave/feedback?label=OK", image.read_bytes())
    assert status == 202 and first["status"] == "stored", first
    assert first["id"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert first["bank_sha256"] == served["original"] and first["score"] > 0
    # The score it got is the score inspection gives.
    inspected = c.call("POST", "/v1/inspect/weave", image.read_bytes())[1]
    assert first["score"] == pytest.approx(inspected["score"], rel=1e-4)
    assert first["service_label"] == inspected["label"]
    status, again, _ = c.call("POST", "/v1/banks/weave/feedback?label=ok", image.read_bytes())
    assert status == 202 and again["status"] == "duplicate" and again["id"] == first["id"]
    assert list(_sidecars(served, "weave")) == [first["id"]]
    assert len(list((served["banks"] / "feedback" / "weave").glob("*.png"))) == 1
    for path, code in (("/v1/banks/weave/feedback?label=maybe", 400), ("/v1/banks/nope/feedback?label=OK", 404)):
        status, answer, _ = c.call("POST", path, image.read_bytes())
        assert status == code, answer
    status, answer, _ = c.call("POST", "/v1/banks/weave/feedback?label=OK", b"not an image")
    assert status == 415 and answer["error"]["code"] == "not_an_image"


# ---------------------------------------------------------------------- learn
def test_learn_under_load_switches_the_probe_once(served):
    """8 normal images and 4 defects as OK feedback, then a learn while 3 clients inspect throughout."""
    from ocbank.jobs import AUTO_GATE_MULTIPLE

    c = served["client"]
    good, defects = _images(served, "good")[:8], _images(served, "blob")[:2] + _images(served, "scratch")[:2]
    for f in good + defects:
        status, answer, _ = c.call("POST", "/v1/banks/weave/feedback?label=OK", f.read_bytes())
        assert status == 202, answer
    probe = good[1].read_bytes()
    old = served["original"]
    seen: list[list[tuple[str, float, int]]] = [[] for _ in range(LOAD_CLIENTS)]
    done = threading.Event()

    def inspect(i: int) -> None:
        deadline = time.monotonic() + LOAD_LIMIT_S
        while not done.is_set() and time.monotonic() < deadline:
            status, answer, _ = Client(served["port"], INSPECT).call("POST", "/v1/inspect/weave", probe)
            seen[i].append((answer.get("bank_sha256", ""), answer.get("score", float("nan")), status))

    workers = [threading.Thread(target=inspect, args=(i,)) for i in range(LOAD_CLIENTS)]
    for w in workers:
        w.start()
    try:
        time.sleep(1.0)
        status, answer, _ = c.call("POST", "/v1/banks/weave/learn")
        assert status == 202 and answer["state"] == "running", answer
        status, answer, _ = c.call("POST", "/v1/banks/weave/learn")
        assert status == 409 and answer["error"]["code"] == "learn_running"
        report = c.wait_learn("weave")
        time.sleep(2.0)  # inspections after the reload too
    finally:
        done.set()
        for w in workers:
            w.join(timeout=120)
    assert report["state"] == "succeeded", report
    new = report["new_sha256"]
    assert report["old_sha256"] == old and new != old and new == _sha(served["banks"] / "weave.h5")
    assert report["seconds"] > 0

    # The gate's split, against the scores the feedback got from the same parent bank
    # (an image within 1% of the gate may tip either way).
    sidecars = _sidecars(served, "weave")
    assert len(sidecars) == 12
    held = {h["id"] for h in report["held_back"]}
    assert report["absorbed"] + len(held) == 12
    for fid, side in sidecars.items():
        margin = side["normalized"] / AUTO_GATE_MULTIPLE
        if abs(margin - 1) > 0.01:
            assert (fid in held) == (margin > 1), side
        assert (side["absorbed_into"] == new) != bool(side["held_back"]), side
    assert held, "no defect scored above the gate: the test cannot show the gate"

    # Under load: no request failed; each client saw the old bank, then the new, never back.
    for rows in seen:
        assert rows and all(status == 200 for _, _, status in rows), rows
        shas = [sha for sha, _, _ in rows]
        assert set(shas) <= {old, new}
        switch = shas.index(new) if new in shas else len(shas)
        assert shas[:switch] == [old] * switch and shas[switch:] == [new] * (len(shas) - switch), shas
    everything = [row for rows in seen for row in rows]
    old_scores = {round(s, 3) for sha, s, _ in everything if sha == old}
    new_scores = {round(s, 3) for sha, s, _ in everything if sha == new}
    assert len(old_scores) == 1 and len(new_scores) == 1, (old_scores, new_scores)
    assert new_scores.pop() < old_scores.pop()  # the probe was absorbed: it now lies in the bank
    assert any(sha == new for sha, _, _ in seen[0])

    banks = c.call("GET", "/v1/banks")[1]["banks"]["weave"]
    assert banks["bank_sha256"] == new and banks["calibration"]["state"] == "stale"
    assert "Recalibrate" in banks["calibration"]["reason"]
    line = _terminal_line(served, "learned weave")
    assert f"{old[:12]} -> {new[:12]}" in line and "K " in line and "recalibrate" in line
    assert "ocbank-serve-" not in line and "/tmp" not in line
    # Nothing is waiting: a second learn changes nothing and absorbs nothing twice.
    assert c.call("POST", "/v1/banks/weave/learn")[0] == 202
    again = c.wait_learn("weave")
    assert again["state"] == "succeeded" and again["absorbed"] == 0 and again["new_sha256"] == new


def test_versions_and_rollback(served):
    c = served["client"]
    current = _sha(served["banks"] / "weave.h5")
    status, body, _ = c.call("GET", "/v1/banks/weave/versions")
    assert status == 200 and body["served_sha256"] == current
    shas = [v["bank_sha256"] for v in body["versions"]]
    assert served["original"] in shas and current in shas
    status, body, _ = c.call("POST", f"/v1/banks/weave/rollback?to={served['original'][:12]}")
    assert status == 200, body
    assert body["old_sha256"] == current and body["new_sha256"] == served["original"]
    assert _sha(served["banks"] / "weave.h5") == served["original"]
    image = _images(served, "good")[3].read_bytes()
    status, answer, _ = c.call("POST", "/v1/inspect/weave", image)
    assert status == 200 and answer["bank_sha256"] == served["original"]
    line = _terminal_line(served, "rolled back weave")
    assert f"{current[:12]} -> {served['original'][:12]}" in line
    for query, code in (("to=ffffffffffff", 404), ("", 400)):
        status, answer, _ = c.call("POST", f"/v1/banks/weave/rollback?{query}")
        assert status == code, answer


# ---------------------------------------------------------------------- drift
def test_false_alarm_feedback_turns_calibration_to_drifting(served):
    c = served["client"]
    assert c.call("GET", "/v1/banks")[1]["banks"]["drift"]["calibration"]["state"] == "ok"
    false_alarms = 0
    for f in _images(served, "blob") + _images(served, "scratch"):
        status, answer, _ = c.call("POST", "/v1/banks/drift/feedback?label=OK", f.read_bytes())
        assert status == 202
        false_alarms += answer["service_label"] == "NG"
    assert false_alarms >= 6, "the demo defects must mostly score NG for this test to mean anything"
    health = c.call("GET", "/v1/banks")[1]["banks"]["drift"]["calibration"]
    assert health["state"] == "drifting" and health["false_alarms"] == false_alarms, health
    assert "Recalibrate" in health["reason"] and f"{false_alarms} NG call(s)" in health["reason"]
    metrics = c.call("GET", "/metrics")[1]
    assert 'ocbank_calibration_state{product="drift",state="drifting"} 1.0' in metrics
    assert 'ocbank_normalized_score_bucket{le="1.0",product="weave"}' in metrics
    # A recalibrating update, then a reload: ok again.
    bank = served["banks"] / "drift.h5"
    cmd = [sys.executable, "-m", "ocbank.cli", "-q", "update", "--bank", str(bank), "--input",
           str(_images(served, "good")[-1]), "--calibration", str(served["calibration"]), "--out", str(bank)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    status, answer, _ = c.call("POST", "/v1/banks/drift/reload")
    assert status == 200 and answer["changed"], answer
    health = c.call("GET", "/v1/banks")[1]["banks"]["drift"]["calibration"]
    assert health["state"] == "ok", health


# ---------------------------------------------------------------------- secrets
def test_no_token_in_any_log_or_metric(served):
    c = served["client"]
    c.call("POST", "/v1/banks/weave/reload", token=WRONG)  # a refused token is not logged either
    texts = {"serve log": _log(served), "metrics": c.call("GET", "/metrics")[1],
             "banks": json.dumps(c.call("GET", "/v1/banks")[1])}
    dirs = session_dirs(served)
    assert dirs, "the Ray session folder of the server was not found"
    for d in dirs:
        for f in d.rglob("*"):
            if f.is_file() and f.suffix in (".log", ".out", ".err", ".txt", ".json"):
                texts[str(f)] = f.read_text(errors="replace")
    for where, text in texts.items():
        for secret in (TOKEN, WRONG, INSPECT):
            assert secret not in text, where
