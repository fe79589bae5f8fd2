"""The learning loop's parts without a server: tokens, feedback storage, calibration health, learn recovery."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from ocbank.errors import ConfigError  # noqa: E402
from ocbank.serve import feedback as fb  # noqa: E402
from ocbank.serve.api import ApiError  # noqa: E402
from ocbank.serve.auth import Secret, authorize, bearer, check_exposure, is_loopback, read_token  # noqa: E402
from ocbank.serve.health import calibration_health  # noqa: E402
from ocbank.serve.options import ServeOptions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN = "t0k3n-abcdefghijklmnop-0123456789"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------------- tokens
def test_token_file_is_read_validated_and_never_printed(token_file, tmp_path):
    secret = read_token(str(token_file), "--admin-token-file")
    assert secret.matches(TOKEN) and not secret.matches(TOKEN[:-1]) and not secret.matches(None)
    assert not secret.matches(TOKEN + "x") and not secret.matches("é" * 10)
    options = ServeOptions(banks="b", admin_token_file=str(token_file))
    assert options.admin_token is not None and options.admin_token.matches(TOKEN)
    assert TOKEN not in repr(options) and TOKEN not in str(options.admin_token)
    for bad, why in (("", "at least"), ("short", "at least"), ("has a space inside it!", "no spaces")):
        path = tmp_path / "bad.token"
        path.write_text(bad)
        with pytest.raises(ConfigError, match=why):
            read_token(str(path), "--admin-token-file")
    with pytest.raises(ConfigError, match="is not a file"):
        ServeOptions(banks="b", admin_token_file=str(tmp_path / "missing"))


def test_loose_token_file_permissions_warn(token_file, caplog):
    token_file.chmod(0o644)
    read_token(str(token_file), "--admin-token-file")
    assert "chmod 600" in caplog.text and TOKEN not in caplog.text


def test_bearer_header_and_401():
    secret = Secret(TOKEN)
    assert bearer(f"Bearer {TOKEN}") == TOKEN and bearer(f"bearer  {TOKEN} ") == TOKEN
    assert bearer(f"Basic {TOKEN}") is None and bearer(None) is None and bearer("Bearer") is None
    authorize(f"Bearer {TOKEN}", (secret,), "reload")
    authorize(None, (None,), "reload")  # no token configured: open
    for header in (None, "Bearer wrong-token-0123456789", f"Basic {TOKEN}"):
        with pytest.raises(ApiError) as caught:
            authorize(header, (secret,), "reload")
        err = caught.value
        assert err.status == 401 and err.code == "unauthorized" and err.headers() == {"WWW-Authenticate": "Bearer"}
        assert TOKEN not in err.message and "wrong-token" not in err.message
    inspect = Secret("inspect-token-0123456789")
    authorize("Bearer inspect-token-0123456789", (inspect, secret), "inspection")
    authorize(f"Bearer {TOKEN}", (inspect, secret), "inspection")


def test_non_loopback_host_needs_a_token_or_an_explicit_opt_out(token_file):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.1")
    assert not is_loopback("myhost")
    with pytest.raises(ConfigError, match="--host 0.0.0.0 .*--admin-token-file"):
        check_exposure("0.0.0.0", None, allow_unauthenticated=False)
    check_exposure("0.0.0.0", None, allow_unauthenticated=True)
    check_exposure("0.0.0.0", Secret(TOKEN), allow_unauthenticated=False)
    check_exposure("127.0.0.1", None, allow_unauthenticated=False)
    assert ServeOptions(banks="b", host="0.0.0.0", admin_token_file=str(token_file)).admin_token is not None


def test_cli_refuses_an_open_public_host_before_starting(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "ocbank.cli", "serve", "--banks", str(tmp_path), "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "--host 0.0.0.0" in lines[0] and "--allow-unauthenticated" in lines[0]


# ---------------------------------------------------------------------- feedback
def _png(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_feedback_is_stored_by_content_hash_and_a_retry_is_no_duplicate(tmp_path):
    scored = {"score": 1.5, "normalized": 1.2, "label": "NG", "bank_sha256": "a" * 64}
    first = fb.store(tmp_path, "weave", _png(0), "OK", scored)
    again = fb.store(tmp_path, "weave", _png(0), "OK", {})
    assert first["status"] == "stored" and again["status"] == "duplicate" and again["id"] == first["id"]
    folder = fb.feedback_dir(tmp_path, "weave")
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{first['id']}.png", f"{first['id']}.json"])
    side = json.loads((folder / f"{first['id']}.json").read_text())
    assert side["label"] == "OK" and side["score"] == 1.5 and side["service_label"] == "NG"
    assert side["bank_sha256"] == "a" * 64 and side["time"].endswith("Z") and side["absorbed_into"] is None
    assert [r["id"] for r in fb.pending(tmp_path, "weave")] == [first["id"]]
    other = fb.store(tmp_path, "weave", _png(1), "NG", scored)
    assert other["id"] != first["id"] and [r["id"] for r in fb.pending(tmp_path, "weave")] == [first["id"]]
    assert fb.store(tmp_path, "weave", _png(1), "OK", {})["status"] == "relabelled"
    assert len(fb.pending(tmp_path, "weave")) == 2
    fb.mark(tmp_path, "weave", first["id"], absorbed_into="b" * 64)
    assert [r["id"] for r in fb.pending(tmp_path, "weave")] == [other["id"]]
    with pytest.raises(ApiError) as caught:
        fb.store(tmp_path, "weave", _png(0), "NG", {})
    assert caught.value.status == 409
    # An image whose sidecar never landed (a crash between the two writes) does not count.
    (folder / f"{other['id']}.json").unlink()
    assert fb.pending(tmp_path, "weave") == []
    assert not list(folder.glob(".*tmp"))


def test_feedback_label_is_checked():
    assert fb.check_label("ok") == "OK" and fb.check_label("NG") == "NG"
    for bad in (None, "", "maybe"):
        with pytest.raises(ApiError, match="label must be OK or NG"):
            fb.check_label(bad)


# ---------------------------------------------------------------------- health
DECISION = {"image_threshold": 1.0, "pixel_threshold": 1.0, "false_alarm_rate": 0.05, "n_images": 20}


def test_calibration_health_states():
    assert calibration_health({"decision": None}, False, 0, 0)["state"] == "uncalibrated"
    assert calibration_health({"decision": DECISION}, False, 100, 3)["state"] == "ok"
    stale = calibration_health({"decision": DECISION}, True, 0, 0)
    assert stale["state"] == "stale" and "before the bank's last update" in stale["reason"]
    drift = calibration_health({"decision": DECISION}, True, 20, 10)
    assert drift["state"] == "drifting" and "Recalibrate" in drift["reason"] and "10 NG call(s)" in drift["reason"]
    # The same count of false alarms among many more scored images is within calibration.
    assert calibration_health({"decision": DECISION}, False, 400, 10)["state"] == "ok"
    # Feedback without inspections: the images at risk are at least the false alarms.
    assert calibration_health({"decision": DECISION}, False, 0, 10)["state"] == "drifting"


# ---------------------------------------------------------------------- learn's crash windows
class _Crash(Exception):
    pass


@pytest.fixture
def learn_bank(tmp_path):
    """A calibrated bank in tmp/banks and six pending OK feedback images (normal, then two defects)."""
    from ocbank.model.detector import Detector
    from ocbank.synthetic import make_dataset

    root = make_dataset(tmp_path / "data", n_train=20, n_good_test=4, n_defect_test=1, size=80)
    banks = tmp_path / "banks"
    train = sorted((root / "weave" / "train" / "good").glob("*.png"))
    Detector(weights="none", image_size=64, resize=72, radius="auto", radius_images=3, device="cpu", batch_size=4,
             false_alarm_rate=0.05).fit(train[:10]).calibrate(train[10:]).save(banks / "weave.h5")
    files = sorted((root / "weave" / "test" / "good").glob("*.png")) + sorted(
        (root / "weave" / "test").glob("[bs]*/*.png"))
    ids = {fb.store(banks, "weave", f.read_bytes(), "OK", {})["id"] for f in files}
    return banks, ids


def _settled_once(banks: Path, ids: set[str]) -> list[dict]:
    from ocbank.engine.checkpoint import read_metadata

    sidecars = [json.loads((fb.feedback_dir(banks, "weave") / f"{i}.json").read_text()) for i in ids]
    assert all(bool(s["absorbed_into"]) != bool(s["held_back"]) for s in sidecars), sidecars
    lineage = read_metadata(banks / "weave.h5").get("lineage") or []
    assert sum(e["images_added"] for e in lineage) == sum(bool(s["absorbed_into"]) for s in sidecars)
    return sidecars


@pytest.fixture
def three_torch_threads():
    """The process at 3 torch threads (not learn's own count), restored after the test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", ["after_write", "mid_marking"])
def test_a_learn_cut_short_is_finished_exactly_once(learn_bank, monkeypatch, crash_at, three_torch_threads):
    """The two windows a signal cannot show reliably: after the new version is written but before the
    journal says what it absorbed, and between two sidecar marks."""
    from ocbank.serve import learn as learn_mod

    banks, ids = learn_bank
    real_journal, real_mark = learn_mod._journal, learn_mod.mark
    marks: list[str] = []

    def journal(b, p, record):
        if crash_at == "after_write" and record["state"] == "marking":
            raise _Crash
        return real_journal(b, p, record)

    def mark(b, p, fid, **fields):
        marks.append(fid)
        if crash_at == "mid_marking" and len(marks) == 2:
            raise _Crash
        return real_mark(b, p, fid, **fields)

    monkeypatch.setattr(learn_mod, "_journal", journal)
    monkeypatch.setattr(learn_mod, "mark", mark)
    parent = fb.hashlib.sha256((banks / "weave.h5").read_bytes()).hexdigest()
    with pytest.raises(_Crash):
        learn_mod.learn(str(banks), "weave")
    written = fb.hashlib.sha256((banks / "weave.h5").read_bytes()).hexdigest()
    assert written != parent  # the crash came after the new version was written
    monkeypatch.setattr(learn_mod, "_journal", real_journal)
    monkeypatch.setattr(learn_mod, "mark", real_mark)
    entry = learn_mod.learn(str(banks), "weave")
    assert entry["recovered_before"] and entry["candidates"] == [] and entry["new_sha256"] == written
    sidecars = _settled_once(banks, ids)
    assert {s["absorbed_into"] for s in sidecars if s["absorbed_into"]} == {written}
    assert any(s["held_back"] for s in sidecars) and any(s["absorbed_into"] for s in sidecars)
    import torch

    # learn runs at its own thread count and gives the caller's back, also when it raised: the setting is
    # process-wide, and a leak changed every later computation in this process (features move with it).
    assert torch.get_num_threads() == three_torch_threads
