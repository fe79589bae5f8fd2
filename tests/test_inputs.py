"""Inputs as users send them: linked and littered folders, file names beyond ASCII, tensors out of range."""

from __future__ import annotations

import csv
import json
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ocbank import Detector
from ocbank.cli import main
from ocbank.data import Transform, images_in, open_image

from .conftest import assert_close_across_runs, tiny_config


def _train(root) -> list[str]:
    return [str(p) for p in sorted((Path(root) / "weave" / "train" / "good").glob("*.png"))]


def _good(root) -> list[Path]:
    return sorted((Path(root) / "weave" / "test" / "good").glob("*.png"))


@pytest.fixture(scope="module")
def banks(tmp_path_factory, tiny_mvtec, extractor) -> dict[str, Path]:
    """An uncalibrated and a calibrated weave bank, saved once for the tests below."""
    tmp = tmp_path_factory.mktemp("banks")
    paths = _train(tiny_mvtec)
    det = Detector.from_config(tiny_config(tiny_mvtec, bank={"radius": 5.0}), extractor=extractor).fit(paths[:4])
    det.save(tmp / "plain.h5")
    det.calibrate(paths[4:]).save(tmp / "calibrated.h5")
    return {"plain": tmp / "plain.h5", "calibrated": tmp / "calibrated.h5"}


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "scores.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------- folders
@pytest.mark.slow
def test_links_are_followed_dangling_ones_counted_and_resource_forks_ignored(tmp_path, tiny_mvtec, banks, capsys):
    good = _good(tiny_mvtec)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.png").write_bytes(good[1].read_bytes())
    top = tmp_path / "in"
    (top / ".hidden").mkdir(parents=True)
    (top / "__MACOSX").mkdir()
    (top / "a.png").write_bytes(good[0].read_bytes())
    (top / "linked").symlink_to(elsewhere, target_is_directory=True)  # a symlinked sub-folder
    (top / "loop").symlink_to(top, target_is_directory=True)  # a link back up: walked once
    (top / "gone.png").symlink_to(tmp_path / "nowhere.png")  # a dangling link
    (top / "._a.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # macOS AppleDouble resource fork
    (top / ".hidden" / "c.png").write_bytes(good[2].read_bytes())
    (top / "__MACOSX" / "._a.png").write_bytes(b"\x00\x05\x16\x07")
    assert [p.relative_to(top).as_posix() for p in images_in(top)] == ["a.png", "gone.png", "linked/b.png"]

    out = tmp_path / "out"
    assert main(["-q", "predict", "--bank", str(banks["plain"]), "--input", str(top), "--out", str(out)]) == 1
    assert "1 of the 3 input image(s) could not be scored" in capsys.readouterr().err
    rows = {Path(r["path"]).name: r["status"] for r in _rows(out)}
    assert rows == {"a.png": "ok", "gone.png": "unreadable", "b.png": "ok"}


@pytest.mark.slow
def test_fifos_sockets_and_devices_are_skipped_by_name_never_opened(tmp_path, tiny_mvtec, banks, recwarn, capsys,
                                                                       monkeypatch):
    """A FIFO, a socket and a device (behind a link) with image names: listed, counted unreadable, never opened."""
    top = tmp_path / "in"
    top.mkdir()
    (top / "a.png").write_bytes(_good(tiny_mvtec)[0].read_bytes())
    os.mkfifo(top / "b.png")  # opening it for reading would wait for a writer
    monkeypatch.chdir(top)  # a short socket path (sun_path holds ~107 bytes)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("c.png")
    (top / "d.png").symlink_to("/dev/zero")
    assert [p.name for p in images_in(top)] == ["a.png", "b.png", "c.png", "d.png"]

    out = tmp_path / "out"
    done: dict[str, int] = {}
    run = threading.Thread(target=lambda: done.update(code=main(
        ["-q", "predict", "--bank", str(banks["plain"]), "--input", str(top), "--out", str(out)])), daemon=True)
    run.start()
    run.join(timeout=120)
    if run.is_alive():  # blocked in open(): give the FIFO a writer so the thread can end, then fail
        os.close(os.open(top / "b.png", os.O_WRONLY | os.O_NONBLOCK))
        run.join(timeout=60)
        pytest.fail("predict blocked opening a FIFO")
    sock.close()
    assert done["code"] == 1
    rows = {Path(r["path"]).name: r["status"] for r in _rows(out)}
    assert rows == {"a.png": "ok", "b.png": "unreadable", "c.png": "unreadable", "d.png": "unreadable"}
    warned = "\n".join(str(w.message) for w in recwarn)
    for name, kind in (("b.png", "a FIFO"), ("c.png", "a socket"), ("d.png", "a character device")):
        assert f"{name} is {kind}" in warned, (name, warned)

    # Given directly, a FIFO is refused with its kind, not as a missing file.
    capsys.readouterr()
    assert main(["-q", "predict", "--bank", str(banks["plain"]), "--input", str(top / "b.png"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is a FIFO" in err and "does not exist" not in err, err


def test_a_fifo_swapped_in_after_the_stat_is_refused_without_blocking(tmp_path, monkeypatch):
    """open_regular's second check: the open never blocks, and fstat refuses what the stat did not see."""
    import stat as stat_module

    from ocbank.data import images
    from ocbank.errors import DataError

    fifo = tmp_path / "late.png"
    os.mkfifo(fifo)
    regular = os.stat_result((stat_module.S_IFREG | 0o644, *[0] * 9))
    monkeypatch.setattr(images.os, "stat", lambda path: regular)  # as if a file was there when it was checked
    done: dict[str, str] = {}

    def read() -> None:
        try:
            images.open_regular(fifo)
        except DataError as exc:
            done["error"] = str(exc)

    run = threading.Thread(target=read, daemon=True)
    run.start()
    run.join(timeout=30)
    if run.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("open_regular blocked on a FIFO")
    assert "is a FIFO" in done.get("error", ""), done


# ---------------------------------------------------------------------- tensors
def _unit_batch(paths: list[Path]) -> torch.Tensor:
    """The documented tensor input: resized and cropped RGB in [0, 1], [N, 3, 64, 64]."""
    rgb = [Transform(72, 64).image(open_image(str(p)))[1] for p in paths]
    return torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float() / 255.0


@pytest.mark.slow
def test_a_tensor_in_0_255_follows_the_array_rule_skipped_by_name(banks, tiny_mvtec):
    det = Detector.load(banks["plain"])
    good = _good(tiny_mvtec)[:3]
    unit = _unit_batch(good)
    mixed = unit.clone()
    mixed[1] *= 255  # the usual mistake: not dividing by 255
    mixed[2, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning) as caught:
        pred = det.predict(mixed)
    text = " ".join(str(w.message) for w in caught)
    assert "tensor[1]" in text and "divide by 255" in text and "tensor[2]" in text and "NaN" in text
    assert np.isnan(pred.scores[1:]).all() and np.isfinite(pred.scores[0])
    assert_close_across_runs(pred.scores[:1], det.predict(unit[:1]).scores)
    # numpy arrays with the same mistake: the same rule, the same words
    arrays = [np.asarray(unit[i].permute(1, 2, 0)) for i in range(3)]
    with pytest.warns(UserWarning, match="divide by 255"):
        scores = det.predict([arrays[0], arrays[1] * 255]).scores
    assert np.isfinite(scores[0]) and np.isnan(scores[1])
    # partial_fit: nothing enters the bank from the out-of-range image, and it is named
    n_seen = det.bank.n_seen
    with pytest.warns(UserWarning, match="tensor\\[1\\]"):
        det.partial_fit(mixed[:2])
    assert det.bank.n_seen == n_seen + 8 * 8 and det.last_partial_fit_.skipped_files == ("tensor[1]",)
    with pytest.warns(UserWarning):
        det.partial_fit([arrays[0], arrays[1] * 255])
    assert det.last_partial_fit_.skipped_files == ("images[1]",)  # a position, not the array's repr


# ---------------------------------------------------------------------- file names and outputs
LATIN1 = b"caf\xe9 cr\xe8me.png"  # not UTF-8: as old cameras and Windows shares write names
LONGEST = "x" * 250 + ".png"  # 254 bytes: legal, and the derived overlay name would not be


def _as_text(path: Path) -> str:
    """Independent reference for a name in scores.csv: undecodable bytes as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _named_folder(folder: Path, pictures: list[Path]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [os.fsdecode(LATIN1), "plain.png", LONGEST]
    for name, src in zip(names, pictures, strict=False):
        (folder / name).write_bytes(src.read_bytes())
    return sorted(folder / n for n in names)


@pytest.mark.slow
def test_names_beyond_utf8_and_at_the_length_limit_keep_every_result(tmp_path, tiny_mvtec, banks, capsys):
    files = _named_folder(tmp_path / "in", _good(tiny_mvtec))
    out = tmp_path / "out"
    argv = ["-q", "predict", "--bank", str(banks["calibrated"]), "--input", str(tmp_path / "in"),
            "--save-maps", "--save-masks"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "\\xe9" in capsys.readouterr().out  # printed escaped, not a UnicodeEncodeError
    rows = _rows(out)
    assert [r["path"] for r in rows] == [_as_text(f) for f in files] and all(r["status"] == "ok" for r in rows)
    for sub in ("heatmaps", "maps", "masks"):
        written = sorted(os.listdir(out / sub))
        assert len(written) == 3 and all(len(os.fsencode(n)) <= 255 for n in written), sub

    # One kind of output cannot be written (a file where its folder should be): the rest is kept.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "masks").write_text("in the way")
    with pytest.warns(UserWarning, match="could not write .*masks"):
        assert main([*argv, "--out", str(blocked)]) == 1
    assert "3 output file(s) could not be written" in capsys.readouterr().err
    assert [r["status"] for r in _rows(blocked)] == ["ok"] * 3
    assert len(os.listdir(blocked / "heatmaps")) == 3 and len(os.listdir(blocked / "maps")) == 3


@pytest.mark.slow  # builds and evaluates through the CLI
def test_build_and_evaluate_take_names_beyond_utf8(tmp_path, tiny_mvtec):
    root = tmp_path / "data"
    train, test = root / "weave" / "train" / "good", root / "weave" / "test" / "good"
    pictures = sorted((Path(tiny_mvtec) / "weave" / "train" / "good").glob("*.png"))
    _named_folder(train, pictures[:3])
    _named_folder(test, _good(tiny_mvtec))
    defect = sorted((Path(tiny_mvtec) / "weave" / "test" / "scratch").glob("*.png"))[0]
    (root / "weave" / "test" / "scratch").mkdir()
    (root / "weave" / "test" / "scratch" / LONGEST).write_bytes(defect.read_bytes())  # its overlay name is cut
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(root, bank={"radius": 5.0})))
    assert main(["-q", "build", "--config", str(cfg), "--out", str(tmp_path / "banks")]) == 0
    summary = json.loads((tmp_path / "banks" / "build_summary.json").read_text(encoding="utf-8"))
    row = summary["classes"]["weave"]
    assert row["status"] == "built" and row["images_used"] + row["calibration"]["n_images"] == 3
    out = tmp_path / "eval"
    assert main(["-q", "evaluate", "--config", str(cfg), "--banks", str(tmp_path / "banks"), "--out", str(out)]) == 0
    with open(out / "scores.csv", newline="", encoding="utf-8") as fh:
        paths = [r["path"] for r in csv.DictReader(fh)]
    assert _as_text(test / os.fsdecode(LATIN1)) in paths and len(paths) == 4
    assert "</html>" in (out / "report.html").read_bytes().decode("utf-8")  # written whole, valid UTF-8
    overlays = os.listdir(out / "heatmaps" / "weave")
    assert len(overlays) == 1 and len(os.fsencode(overlays[0])) <= 255
    # The overlays cannot be written (a file where their folder goes): every score is still kept.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "heatmaps").write_text("in the way")
    with pytest.warns(UserWarning, match="could not write"):
        code = main(["-q", "evaluate", "--config", str(cfg), "--banks", str(tmp_path / "banks"), "--out", str(blocked)])
    assert code == 1 and json.loads((blocked / "metrics.json").read_text())["n_outputs_failed"] == 1
    assert len((blocked / "scores.csv").read_text(encoding="utf-8").splitlines()) == 5


@pytest.mark.slow
def test_save_masks_on_an_uncalibrated_bank_is_refused_by_name(tmp_path, tiny_mvtec, banks, capsys):
    out = tmp_path / "out"
    argv = ["-q", "predict", "--bank", str(banks["plain"]), "--input", str(_good(tiny_mvtec)[0]), "--out", str(out)]
    assert main([*argv, "--save-masks"]) == 2
    err = capsys.readouterr().err
    assert "--save-masks needs a calibrated bank" in err and str(banks["plain"]) in err
    assert not (out / "scores.csv").exists()
    assert main(argv) == 0  # without masks the same bank scores


def test_every_loader_warning_names_its_files_on_one_line(tmp_path, tiny_mvtec):
    """The skip, unreadable-mask and no-mask warnings escape control characters and non-UTF-8 bytes alike."""
    import warnings

    from ocbank.data import Sample, escape_path
    from ocbank.data.loader import ImageDataset

    good = sorted((tiny_mvtec / "weave" / "train" / "good").glob("*.png"))[0]
    image = tmp_path / "line\nbreak\udce9.png"
    image.write_bytes(good.read_bytes())
    mask = tmp_path / "mask\tbad.png"
    mask.write_bytes(b"not a png")
    samples = [Sample(str(image), label=1, mask=str(mask)), Sample(str(image), label=1)]
    data = ImageDataset(samples, Transform(resize=72, crop=64), with_masks=True)
    for i in range(len(samples)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            data[i]
        (message,) = [str(w.message) for w in seen]
        assert "\n" not in message and "\t" not in message, message
        assert escape_path(image) in message
        message.encode("utf-8")  # no lone surrogate left
