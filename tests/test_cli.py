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

from ocbank.cli import main

from .conftest import tiny_config
from .test_data_config import _realiad


def write_cfg(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


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
        assert row["n_test"] == 7 and row["n_centroids"] > 0 and row["bank_bytes"] == row["n_centroids"] * (1536 * 4 + 8)
    assert report["mean"]["image_auroc"] == pytest.approx(
        np.mean([report["classes"][c]["image_auroc"] for c in ("dots", "weave")])
    )
    rows = list(csv.DictReader(open(tmp_path / "eval" / "scores.csv")))
    assert len(rows) == 14 and {r["class"] for r in rows} == {"dots", "weave"}
    assert len(list((tmp_path / "eval" / "heatmaps").rglob("*.png"))) == 4

    from ocbank.engine.checkpoint import read_metadata

    meta = read_metadata(tmp_path / "banks" / "weave.h5")
    assert meta["backbone"]["weights"] == "none" and meta["feature_grid"] == [8, 8]
    assert meta["radius"] > 0 and meta["config"]["data"]["format"] == "mvtec"

    test_dir = Path(tiny_mvtec) / "weave" / "test" / "blob"
    assert main(["-q", "predict", "--bank", str(tmp_path / "banks" / "weave.h5"), "--input", str(test_dir),
                 "--out", str(tmp_path / "pred"), "--save-maps"]) == 0
    pred = list(csv.DictReader(open(tmp_path / "pred" / "scores.csv")))
    assert len(pred) == 2 and all(float(r["score"]) > 0 for r in pred)
    assert len(list((tmp_path / "pred" / "heatmaps").glob("*.png"))) == 2
    assert np.load(next((tmp_path / "pred" / "maps").glob("*.npy"))).shape == (64, 64)


def test_build_and_evaluate_realiad(tmp_path):
    root = _realiad(tmp_path)
    cfg = write_cfg(tmp_path, tiny_config(root, data={"format": "realiad"}, bank={"radius": 30.0}))
    assert main(["-q", "build", "--config", str(cfg), "--out", str(tmp_path / "b")]) == 0
    assert main(["-q", "evaluate", "--config", str(cfg), "--banks", str(tmp_path / "b"), "--out", str(tmp_path / "e")]) == 0
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert report["classes"]["pcb"]["n_test"] == 2 and report["classes"]["pcb"]["radius"] == 30.0


def test_suggest_radius(tmp_path, tiny_mvtec, capsys):
    cfg = write_cfg(tmp_path, tiny_config(tiny_mvtec))
    assert main(["-q", "suggest-radius", "--config", str(cfg), "--classes", "weave", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "p99" in out and "weave" in out
    stats = json.loads((tmp_path / "r.json").read_text())["weave"]
    assert stats["p50"] <= stats["p90"] <= stats["p95"] <= stats["p99"] == stats["suggested"]


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


def test_class_without_training_images_is_an_error(tmp_path, capsys):
    (tmp_path / "data" / "empty" / "train" / "good").mkdir(parents=True)
    cfg = write_cfg(tmp_path, tiny_config(tmp_path / "data"))
    assert main(["-q", "build", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "class 'empty' failed" in err and "no training images" in err


def test_evaluate_refuses_a_bank_built_with_other_features(tmp_path, tiny_mvtec, capsys):
    cfg = write_cfg(tmp_path, tiny_config(tiny_mvtec, data={"classes": ["weave"]}))
    assert main(["-q", "build", "--config", str(cfg), "--out", str(tmp_path / "b")]) == 0
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(tiny_config(tiny_mvtec, data={"classes": ["weave"], "crop": 56})))
    assert main(["-q", "evaluate", "--config", str(other), "--banks", str(tmp_path / "b"), "--out", str(tmp_path / "e")]) == 2
    assert "image size" in capsys.readouterr().err
