"""The ocbank CLI end to end on miniature MVTec and Real-IAD layouts."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ocbank import cli
from ocbank.cli import main

from .conftest import tiny_config
from .test_data_config import _realiad


def write_cfg(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_build_evaluate_predict_mvtec(tmp_path, tiny_mvtec, capsys):
    cfg = write_cfg(tmp_path, tiny_config(tiny_mvtec))
    assert main(["-q", "build", "--config", str(cfg), "--out", str(tmp_path / "banks")]) == 0
    assert sorted(p.name for p in (tmp_path / "banks").glob("*.h5")) == ["dots.h5", "weave.h5"]
    assert main(["-q", "evaluate", "--config", str(cfg), "--banks", str(tmp_path / "banks"),
                 "--out", str(tmp_path / "eval"), "--heatmaps", "2"]) == 0
    out = capsys.readouterr().out
    assert "img AUROC" in out and "mean" in out
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for name in ("dots", "weave"):
        row = report["classes"][name]
        assert 0 <= row["image_auroc"] <= 1 and 0 <= row["pixel_auroc"] <= 1 and 0 <= row["aupro"] <= 1
        assert row["n_test"] == 7 and row["n_centroids"] > 0
        assert row["bank_bytes"] == row["n_centroids"] * (1536 * 4 + 8)
    assert report["mean"]["image_auroc"] == pytest.approx(
        np.mean([report["classes"][c]["image_auroc"] for c in ("dots", "weave")])
    )
    rows = list(csv.DictReader(open(tmp_path / "eval" / "scores.csv")))
    assert len(rows) == 14 and {r["class"] for r in rows} == {"dots", "weave"}
    from sklearn.metrics import roc_auc_score

    for name in ("dots", "weave"):  # an independent reference for the image AUROC
        mine = [r for r in rows if r["class"] == name]
        ref = roc_auc_score([int(r["label"]) for r in mine], [float(r["score"]) for r in mine])
        assert report["classes"][name]["image_auroc"] == pytest.approx(ref, abs=1e-6)
    assert len(list((tmp_path / "eval" / "heatmaps").rglob("*.png"))) == 4

    from ocbank.engine.checkpoint import read_metadata

    meta = read_metadata(tmp_path / "banks" / "weave.h5")
    assert meta["backbone"]["weights"] == "none" and meta["feature_grid"] == [8, 8]
    assert meta["radius"] > 0 and meta["config"]["data"]["format"] == "mvtec"

    test_dir = Path(tiny_mvtec) / "weave" / "test" / "blob"
    assert main(["-q", "predict", "--bank", str(tmp_path / "banks" / "weave.h5"), "--input", str(test_dir),
                 "--out", str(tmp_path / "pred"), "--save-maps"]) == 0
    with open(tmp_path / "pred" / "scores.csv", newline="") as fh:
        assert next(csv.reader(fh)) == ["path", "score", "label", "normalized", "status"]
    pred = list(csv.DictReader(open(tmp_path / "pred" / "scores.csv")))
    assert len(pred) == 2 and all(float(r["score"]) > 0 for r in pred)
    assert len(list((tmp_path / "pred" / "heatmaps").glob("*.png"))) == 2
    assert np.load(next((tmp_path / "pred" / "maps").glob("*.npy"))).shape == (64, 64)
    # Calibrated bank (the build held out one training image): labels, normalised scores, masks, overlays.
    thr = meta["decision"]["image_threshold"]
    for r in pred:
        assert r["label"] == ("NG" if float(r["score"]) > thr else "OK")
        assert float(r["normalized"]) == pytest.approx(float(r["score"]) / thr, rel=1e-5)
    all_dir = Path(tiny_mvtec) / "weave" / "test"
    assert main(["-q", "predict", "--bank", str(tmp_path / "banks" / "weave.h5"), "--input", str(all_dir),
                 "--out", str(tmp_path / "ng"), "--overlays", "ng", "--save-masks"]) == 0
    ng = [r for r in csv.DictReader(open(tmp_path / "ng" / "scores.csv")) if r["label"] == "NG"]
    assert len(list((tmp_path / "ng" / "heatmaps").glob("*.png"))) == len(ng)
    masks = sorted((tmp_path / "ng" / "masks").glob("*.png"))
    assert len(masks) == 7 and set(np.unique(np.asarray(Image.open(masks[0])))) <= {0, 255}


@pytest.mark.slow
def test_build_and_evaluate_realiad(tmp_path):
    root = _realiad(tmp_path)
    cfg = write_cfg(tmp_path, tiny_config(root, data={"format": "realiad"}, bank={"radius": 30.0}))
    assert main(["-q", "build", "--config", str(cfg), "--out", str(tmp_path / "b")]) == 0
    assert main(["-q", "evaluate", "--config", str(cfg), "--banks", str(tmp_path / "b"),
                 "--out", str(tmp_path / "e")]) == 0
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert report["classes"]["pcb"]["n_test"] == 2 and report["classes"]["pcb"]["radius"] == 30.0


@pytest.mark.slow
def test_suggest_radius(tmp_path, tiny_mvtec, capsys):
    cfg = write_cfg(tmp_path, tiny_config(tiny_mvtec))
    assert main(["-q", "suggest-radius", "--config", str(cfg), "--classes", "weave",
                 "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "p99" in out and "weave" in out
    stats = json.loads((tmp_path / "r.json").read_text())["weave"]
    assert stats["p50"] <= stats["p90"] <= stats["p95"] <= stats["p99"] == stats["suggested"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cfg_edit", "words"),
    [
        (lambda c: c["data"].update(colour=1), "unknown config key 'data.colour'"),
        (lambda c: c["data"].update(root="/no/such/dir"), "/no/such/dir"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, tiny_mvtec, cfg_edit, words):
    cfg = tiny_config(tiny_mvtec)
    cfg_edit(cfg)
    path = write_cfg(tmp_path, cfg)
    cmd = [sys.executable, "-m", "ocbank.cli", "build", "--config", str(path), "--out", str(tmp_path / "o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in res.stderr
    debug = subprocess.run([*cmd[:3], "--debug", *cmd[3:]], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.slow
def test_class_without_training_images_is_an_error(tmp_path, capsys):
    (tmp_path / "data" / "empty" / "train" / "good").mkdir(parents=True)
    cfg = write_cfg(tmp_path, tiny_config(tmp_path / "data"))
    assert main(["-q", "build", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2  # no class built
    err = capsys.readouterr().err
    assert "class 'empty' failed" in err and "no training images" in err


@pytest.mark.slow
def test_evaluate_refuses_a_bank_built_with_other_features(tmp_path, tiny_mvtec, capsys):
    cfg = write_cfg(tmp_path, tiny_config(tiny_mvtec, data={"classes": ["weave"]}))
    assert main(["-q", "build", "--config", str(cfg), "--out", str(tmp_path / "b")]) == 0
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(tiny_config(tiny_mvtec, data={"classes": ["weave"], "crop": 56})))
    assert main(["-q", "evaluate", "--config", str(other), "--banks", str(tmp_path / "b"),
                 "--out", str(tmp_path / "e")]) == 2
    assert "image size" in capsys.readouterr().err


# ---------------------------------------------------------------------- trust at the door
def _strict_json(path: Path) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def build_weave_bank(tmp_path_factory: pytest.TempPathFactory, root: Path) -> dict[str, Path]:
    """One weave bank built by the CLI: {"cfg", "banks", "bank", "root"} (each module's shared bank)."""
    tmp = tmp_path_factory.mktemp("weave")
    cfg = write_cfg(tmp, tiny_config(root, data={"classes": ["weave"]}))
    assert main(["-q", "build", "--config", str(cfg), "--out", str(tmp / "banks")]) == 0
    return {"cfg": cfg, "banks": tmp / "banks", "bank": tmp / "banks" / "weave.h5", "root": Path(root)}


@pytest.fixture(scope="module")
def weave(tmp_path_factory, tiny_mvtec) -> dict[str, Path]:
    """One weave bank built by the CLI, shared by the tests below."""
    return build_weave_bank(tmp_path_factory, tiny_mvtec)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["build", "--ray-cpus", "0"], "--ray-cpus: must be an integer >= 1, got '0'"),
        (["build", "--checkpoint-every", "0"], "--checkpoint-every: must be an integer >= 1"),
        (["build", "--shards", "-2"], "--shards: must be an integer >= 1"),
        (["build", "--threads", "0"], "--threads: must be an integer >= 1"),
        (["build", "--threads", "two"], "--threads: must be an integer >= 1, got 'two'"),
        (["build", "--retries", "-1"], "--retries: must be an integer >= 0"),
        (["build", "--classes", "../x"], "plain name"),
        (["build", "--classes", "weave,,dots"], "plain name"),
        (["build", "--classes", "a\\b"], "plain name"),
        (["build", "--classes", ".."], "plain name"),
        (["evaluate", "--heatmaps", "-1", "--banks", "b"], "--heatmaps: must be an integer >= 0"),
        (["suggest-radius", "--classes", "/etc"], "plain name"),
    ],
)
def test_arguments_are_checked_at_the_door(tmp_path, tiny_mvtec, capsys, argv, words):
    cfg = write_cfg(tmp_path, tiny_config(tiny_mvtec))
    out = [] if argv[0] == "suggest-radius" else ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as info:
        main(["-q", *argv, "--config", str(cfg), *out])
    assert info.value.code == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "out").exists()


def test_error_handler_one_line_for_ocbank_errors_traceback_for_bugs(monkeypatch, capsys, tmp_path):
    from ocbank.errors import DataError
    from ocbank.jobs import predict as predict_mod

    argv = ["-q", "predict", "--bank", "b.h5", "--input", "x.png", "--out", str(tmp_path)]

    def fail_with(exc: BaseException):
        def run(*_a, **_k):
            raise exc

        monkeypatch.setattr(predict_mod, "predict", run)

    fail_with(DataError("input 'x.png' does not exist. Pass image files or folders."))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ocbank: error: input 'x.png' does not exist")
    fail_with(PermissionError(13, "Permission denied", str(tmp_path / "scores.csv")))
    assert main(argv) == 2 and "Permission denied" in capsys.readouterr().err
    fail_with(RuntimeError("a bug"))  # not an OcbankError: a bug, surfaces with its traceback
    with pytest.raises(RuntimeError, match="a bug"):
        main(argv)
    fail_with(KeyError("oops"))
    with pytest.raises(KeyError):
        main(argv)


@pytest.mark.slow
def test_predict_keeps_input_order_and_exit_status_says_what_scored(weave, tmp_path, capsys):
    good = sorted((weave["root"] / "weave" / "test").rglob("*.png"))[:3]
    bad = []
    for i in range(2):
        bad.append(tmp_path / f"broken{i}.png")
        bad[-1].write_bytes(good[0].read_bytes()[:60])
    order = [good[0], bad[0], good[1], bad[1], good[2]]  # one loader batch holds the first four
    argv = ["-q", "predict", "--bank", str(weave["bank"]), "--out"]
    assert main([*argv, str(tmp_path / "mixed"), "--input", *map(str, order)]) == 1
    err = capsys.readouterr().err
    assert "2 of the 5 input image(s) could not be scored" in err
    rows = list(csv.DictReader(open(tmp_path / "mixed" / "scores.csv")))
    assert [r["path"] for r in rows] == [str(p) for p in order]
    assert [r["status"] for r in rows] == ["ok", "unreadable", "ok", "unreadable", "ok"]
    assert all(float(r["score"]) > 0 for r in rows if r["status"] == "ok")
    assert all(r["score"] == "" for r in rows if r["status"] != "ok")

    assert main([*argv, str(tmp_path / "none"), "--input", *map(str, bad)]) == 2  # nothing scored
    assert "none of the 2 input image(s) could be scored" in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "all"), "--input", *map(str, good)]) == 0
    assert "error" not in capsys.readouterr().err


@pytest.mark.slow
def test_partial_checkpoints_are_refused_unless_allowed(weave, tmp_path, capsys):
    from ocbank.engine import ClusterBank
    from ocbank.engine.checkpoint import read_metadata

    meta = {**read_metadata(weave["bank"]), "complete": False, "stream_position": 4, "n_images": 6}
    partial = tmp_path / "weave.partial.h5"
    ClusterBank.load(weave["bank"]).save(partial, metadata=meta)
    image = str(next((weave["root"] / "weave" / "test").rglob("*.png")))
    argv = ["-q", "predict", "--bank", str(partial), "--input", image, "--out", str(tmp_path / "p")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unfinished build checkpoint" in err and "4 of 6" in err and "--allow-partial" in err
    assert not (tmp_path / "p" / "scores.csv").exists()
    assert main([*argv, "--allow-partial"]) == 0

    banks = tmp_path / "banks"
    banks.mkdir()
    ClusterBank.load(weave["bank"]).save(banks / "weave.h5", metadata=meta)  # complete: false, final name
    argv = ["-q", "evaluate", "--config", str(weave["cfg"]), "--banks", str(banks), "--out", str(tmp_path / "e")]
    assert main(argv) == 2 and "--allow-partial" in capsys.readouterr().err
    assert main([*argv, "--allow-partial"]) == 0


@pytest.mark.slow
def test_undefined_metrics_are_null_with_a_reason_and_skips_exit_1(weave, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    src = weave["root"] / "weave"
    shutil.copytree(src / "train", root / "weave" / "train")
    shutil.copytree(src / "test" / "good", root / "weave" / "test" / "good")  # no defect: one label only
    (root / "weave" / "test" / "good" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cfg = write_cfg(tmp_path, tiny_config(root, data={"classes": ["weave"]}))
    assert main(["-q", "evaluate", "--config", str(cfg), "--banks", str(weave["banks"]),
                 "--out", str(tmp_path / "e")]) == 1
    captured = capsys.readouterr()
    assert "1 test image(s) could not be read" in captured.err
    assert "n/a" in captured.out and "no anomalous pixel in the masks" in captured.out
    report = _strict_json(tmp_path / "e" / "metrics.json")
    row = report["classes"]["weave"]
    assert row["image_auroc"] is None and "no anomalous test image" in row["image_auroc_note"]
    assert row["pixel_auroc"] is None and row["pixel_auroc_note"] == "no anomalous pixel in the masks"
    assert row["aupro"] is None and row["aupro_note"] == "no anomalous pixel in the masks"
    assert row["n_test"] == 3 and row["images_skipped"] == 1 and report["images_skipped"] == 1
    assert report["mean"]["image_auroc"] is None and report["mean"]["n_classes"] == {
        "image_auroc": 0, "pixel_auroc": 0, "aupro": 0}


@pytest.mark.slow
def test_evaluate_that_scores_no_image_exits_2(weave, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(weave["root"] / "weave" / "train", root / "weave" / "train")
    (root / "weave" / "test" / "good").mkdir(parents=True)
    (root / "weave" / "test" / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cfg = write_cfg(tmp_path, tiny_config(root, data={"classes": ["weave"]}))
    assert main(["-q", "evaluate", "--config", str(cfg), "--banks", str(weave["banks"]),
                 "--out", str(tmp_path / "e")]) == 2  # nothing scored: not a partial success
    assert "1 test image(s) could not be read" in capsys.readouterr().err
    assert _strict_json(tmp_path / "e" / "metrics.json")["classes"]["weave"]["n_test"] == 0


@pytest.mark.slow
def test_masks_of_any_bit_depth_give_the_same_pixel_metrics(weave, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(weave["root"] / "weave", root / "weave")
    masks = sorted((root / "weave" / "ground_truth").rglob("*.png"))
    assert masks
    for i, path in enumerate(masks):  # 0/255 -> 0/1, 16-bit and palette masks
        binary = np.asarray(Image.open(path)) > 0
        if i % 3 == 0:
            Image.fromarray(binary.astype(np.uint8)).save(path)
        elif i % 3 == 1:
            Image.fromarray(binary.astype(np.uint16) * 7).save(path)
        else:
            Image.fromarray(binary.astype(np.uint8)).convert("P").save(path)
    reports = []
    for name, data_root in (("orig", weave["root"]), ("recoded", root)):
        cfg = write_cfg(tmp_path, tiny_config(data_root, data={"classes": ["weave"]}))
        assert main(["-q", "evaluate", "--config", str(cfg), "--banks", str(weave["banks"]),
                     "--out", str(tmp_path / name), "--heatmaps", "0"]) == 0
        reports.append(_strict_json(tmp_path / name / "metrics.json")["classes"]["weave"])
    assert reports[0]["pixel_auroc"] is not None and 0 < reports[0]["pixel_auroc"] <= 1
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert reports[1][key] == pytest.approx(reports[0][key], abs=1e-9), key


@pytest.mark.parametrize("debug", [[], ["--debug"]])
@pytest.mark.parametrize(("raised", "code"), [(cli.Terminated, 143), (KeyboardInterrupt, 130)])
def test_exit_status_follows_the_signal_with_or_without_debug(monkeypatch, capsys, debug, raised, code):
    def stopped(_args):
        raise raised

    monkeypatch.setattr(cli, "cmd_serve", stopped)
    assert main([*debug, "serve", "--banks", "x"]) == code
    assert ("Traceback" in capsys.readouterr().err) == bool(debug)


@pytest.mark.slow
def test_evaluate_with_a_nan_score_writes_strict_json_and_says_so(tmp_path, tiny_mvtec, monkeypatch, capsys):
    from ocbank.model.detector import Detector

    cfg = write_cfg(tmp_path, tiny_config(tiny_mvtec, data={"classes": ["dots"]}))
    banks = tmp_path / "b"
    assert main(["-q", "build", "--config", str(cfg), "--out", str(banks)]) == 0
    real = Detector.score_batches

    def one_nan(self, images, with_masks=False):
        for i, res in enumerate(real(self, images, with_masks=with_masks)):
            if i == 0:
                res.scores[0] = np.nan  # a computation that failed
            yield res

    monkeypatch.setattr(Detector, "score_batches", one_nan)
    capsys.readouterr()
    out = tmp_path / "e"
    assert main(["-q", "evaluate", "--config", str(cfg), "--banks", str(banks), "--out", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ocbank: error:")]
    assert len(err) == 1 and "1 test image(s) got a NaN score" in err[0], err
    text = (out / "metrics.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"metrics.json holds {c}"))
    row = report["classes"]["dots"]
    assert row["n_nan_scores"] == report["n_nan_scores"] == 1
    assert row["image_auroc"] is None and "not finite" in row["image_auroc_note"]
    assert row["f1_optimal"] is None and row["f1_optimal_note"]
    assert row["pixel_auroc"] is not None  # the maps are whole: pixel metrics stay defined
    if row["calibrated"] is not None:  # NaN is NG by the decision rule
        cal = row["calibrated"]
        assert cal["tp"] + cal["fp"] >= 1 and cal["tp"] + cal["fp"] + cal["fn"] + cal["tn"] == row["n_test"]
