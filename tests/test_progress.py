"""Every long step shows progress on stderr (tqdm), ``-q`` removes it, and each command's last
line names what it wrote."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ocbank import demo, errors
from ocbank.cli import main
from ocbank.model.detector import Detector
from ocbank.model.progress import progress_bar

from .test_cli import build_weave_bank


@pytest.fixture(scope="module")
def banks(tmp_path_factory, tiny_mvtec) -> dict[str, Path]:
    return build_weave_bank(tmp_path_factory, tiny_mvtec)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    assert main(argv) == 0
    got = capsys.readouterr()
    return got.out, got.err


def test_the_bar_counts_every_image_the_detector_reads(banks, tmp_path):
    """The hook in Detector.features advances the open bar by each batch's images, unreadable ones included."""
    images = sorted((banks["root"] / "weave" / "test").rglob("*.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    det = Detector.load(banks["bank"])
    with progress_bar("t", len(images) + 1) as bar:
        det.predict([*images, broken])
        assert bar.n == len(images) + 1
    with progress_bar("t", 3) as bar:
        stats = det.radius_statistics(images)  # the radius sample: radius_images (3) of them
        assert bar.n == 3 == stats.n_images
    det.predict(images)  # no bar open: nothing to count, nothing fails


@pytest.mark.parametrize("quiet", [False, True])
def test_evaluate_predict_update_show_progress_unless_quiet(banks, tmp_path, capsys, quiet):
    q = ["-q"] if quiet else []  # before the command; "ocbank predict ... -q" is checked below
    normal = banks["root"] / "weave" / "test" / "good"
    bars = {
        "evaluate weave": [*q, "evaluate", "--config", str(banks["cfg"]), "--banks", str(banks["banks"]),
                           "--out", str(tmp_path / "eval"), "--heatmaps", "0"],
        "predict": [*q, "predict", "--bank", str(banks["bank"]), "--input", str(normal), "--out", str(tmp_path / "pred")],
        "update": [*q, "update", "--bank", str(banks["bank"]), "--input", str(normal), "--out", str(tmp_path / "u.h5")],
        "calibration": [*q, "update", "--bank", str(banks["bank"]), "--input", str(normal),
                        "--calibration", str(normal), "--out", str(tmp_path / "c.h5")],
        "radius weave": [*q, "suggest-radius", "--config", str(banks["cfg"]), "--classes", "weave"],
    }
    last_lines = {}
    for bar, argv in bars.items():
        out, err = _run(argv, capsys)
        shown = f"{bar}:" in err and "img" in err
        assert shown != quiet, f"{bar}: {err!r}"
        last_lines[bar] = out.strip().splitlines()[-1]
    assert str(tmp_path / "eval" / "report.html") in last_lines["evaluate weave"]
    assert str(tmp_path / "pred" / "scores.csv") in last_lines["predict"]
    assert str(tmp_path / "u.h5") in last_lines["update"]


@pytest.mark.slow
def test_the_demo_shows_progress_and_says_random_weights_once(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setattr(errors, "_SAID", set())
    with caplog.at_level(logging.WARNING):
        assert demo.main(["--out", str(tmp_path), "--smoke"]) == 0
    assert caplog.text.count("randomly initialised") == 1  # the build's backbone and the evaluation's
    got = capsys.readouterr()
    assert "evaluate dots:" in got.err and "dots calibration:" in got.err
    assert got.out.strip().splitlines()[-1].startswith(f"report: {tmp_path / 'results' / 'report.html'}")


def test_quiet_after_the_command_too(banks, tmp_path, capsys):
    normal = str(banks["root"] / "weave" / "test" / "good")
    _, err = _run(["predict", "--bank", str(banks["bank"]), "--input", normal, "--out", str(tmp_path / "p"), "-q"], capsys)
    assert "predict:" not in err
    _, err = _run(["predict", "--bank", str(banks["bank"]), "--input", normal, "--out", str(tmp_path / "p")], capsys)
    assert "predict:" in err
