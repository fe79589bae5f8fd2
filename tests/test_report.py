"""report.html: links, PNGs, the table against metrics.json, thresholds, galleries, curves, a browser render."""

from __future__ import annotations

import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn.metrics import f1_score

from ocbank import config
from ocbank.model.calibration import f1_optimal_threshold

from .chromium import chromium, screenshot
from .conftest import tiny_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Every tag with its attributes; text of the metrics table cells."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


@pytest.fixture(scope="module")
def evaluated(tiny_mvtec, extractor, tmp_path_factory):
    """Banks for both classes ('weave' calibrated in its metadata, 'dots' not), evaluated with the report."""
    from ocbank import Detector
    from ocbank.jobs.evaluate import evaluate

    cfg = config.from_dict(tiny_config(tiny_mvtec))
    banks = tmp_path_factory.mktemp("banks")
    for name in ("weave", "dots"):
        train = sorted((Path(tiny_mvtec) / name / "train" / "good").glob("*.png"))
        det = Detector.from_config(cfg, extractor=extractor).fit([str(p) for p in train])
        extra = {}
        if name == "weave":  # a stand-in calibration
            extra = {"decision": {"image_threshold": 1.5 * det.bank.radius_, "pixel_threshold": det.bank.radius_,
                                  "false_alarm_rate": 0.01, "n_images": 6, "source": "test",
                                  "normalization": "score / image_threshold"}}
        det.save(banks / f"{name}.h5", extra=extra)
    out = tmp_path_factory.mktemp("eval")
    evaluate(cfg, banks, out, heatmaps=0, progress=False)
    page = _Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {"out": out, "page": page, "rows": rows, "banks": banks,
            "metrics": json.loads((out / "metrics.json").read_text())}


@pytest.mark.slow
def test_every_link_is_relative_and_every_image_a_png(evaluated):
    out, tags = evaluated["out"], evaluated["page"].tags
    assert not [t for t, _ in tags if t in ("script", "link", "iframe")]  # no JS, no external CSS
    images = [a["src"] for t, a in tags if t == "img"]
    assert len(images) == 2 * (1 + 3 + 3)  # per class: curves, 3 of 3 normals, 3 of 4 anomalies
    for src in images + [a["href"] for t, a in tags if t == "a"]:
        assert "://" not in src and not src.startswith("/"), src
        if src.startswith("#"):
            continue
        assert (out / src).is_file(), src
    for src in images:
        assert (out / src).read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(out / src) as im:
            im.verify()


@pytest.mark.slow
def test_table_equals_metrics_json(evaluated):
    tags, report = evaluated["page"].tags, evaluated["metrics"]
    rows = [a for t, a in tags if t == "tr" and "data-class" in a]
    assert [r["data-class"] for r in rows] == [*report["classes"], "mean"]
    values = [a["data-value"] for t, a in tags if t == "td" and "data-value" in a]
    keys = ("image_auroc", "pixel_auroc", "aupro", "n_centroids", "bank_bytes", "images_per_s")
    want = [r[k] for r in [*report["classes"].values(), report["mean"]] for k in keys]
    assert len(values) == len(want)
    for got, expect in zip(values, want, strict=True):
        assert got == repr(expect)  # json and repr round-trip floats exactly


def _cm(tags: list[tuple[str, dict[str, str]]], html_text: str) -> list[dict[str, object]]:
    tables = [a for t, a in tags if t == "table" and "data-threshold" in a]
    counts = [int(x) for x in re.findall(r'data-cm="\w+">(\d+)<', html_text)]
    return [{"threshold": float(t["data-threshold"]), "source": t["data-source"], "cm": counts[4 * i: 4 * i + 4]}
            for i, t in enumerate(tables)]


@pytest.mark.slow
def test_threshold_and_confusion_matrix(evaluated):
    html_text = (evaluated["out"] / "report.html").read_text(encoding="utf-8")
    shown = dict(zip(evaluated["metrics"]["classes"], _cm(evaluated["page"].tags, html_text), strict=True))
    from ocbank.engine.checkpoint import read_bank

    calibrated = read_bank(evaluated["banks"] / "weave.h5").metadata["decision"]["image_threshold"]
    assert shown["weave"]["source"] == "calibrated" and shown["weave"]["threshold"] == calibrated
    assert shown["dots"]["source"] == "f1_optimal"
    for name, block in shown.items():
        rows = [r for r in evaluated["rows"] if r["class"] == name]
        labels = np.array([int(r["label"]) for r in rows])
        scores = np.array([float(r["score"]) for r in rows])
        if block["source"] == "f1_optimal":  # brute force over every candidate with scikit-learn's F1
            f1 = [f1_score(labels, scores > t) for t in [scores.min() - 1, *scores]]
            assert f1_score(labels, scores > block["threshold"]) == pytest.approx(max(f1))
        pred = scores > block["threshold"]  # NG when score > threshold (scores.csv rounds to 6 decimals)
        tp, fn = int((pred & (labels == 1)).sum()), int((~pred & (labels == 1)).sum())
        fp, tn = int((pred & (labels == 0)).sum()), int((~pred & (labels == 0)).sum())
        assert block["cm"] == [tp, fn, fp, tn]


@pytest.mark.slow
def test_gallery_shows_highest_normals_and_lowest_anomalies(evaluated):
    html_text = (evaluated["out"] / "report.html").read_text(encoding="utf-8")
    for name in ("weave", "dots"):
        rows = [r for r in evaluated["rows"] if r["class"] == name]
        normals = sorted((r for r in rows if r["label"] == "0"), key=lambda r: -float(r["score"]))[:3]
        anomalies = sorted((r for r in rows if r["label"] == "1"), key=lambda r: float(r["score"]))[:3]
        section = html_text[html_text.index(f'data-class="{name}"><h2>'):]
        section = section[: section.index("</section>")]
        miss = section.index("Lowest-scoring")
        for r, where in [(r, "normal") for r in normals] + [(r, "anomaly") for r in anomalies]:
            label = f"{Path(r['path']).parent.name}/{Path(r['path']).name}"
            pos = section.index(f'alt="{label}"')
            assert (pos < miss) == (where == "normal"), label


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 20)), min_size=2, max_size=25))
def test_f1_optimal_threshold_is_brute_force_best(pairs):
    labels = np.array([p[0] for p in pairs])
    scores = np.array([p[1] for p in pairs], dtype=float)
    found = f1_optimal_threshold(labels, scores)
    if labels.min() == labels.max():
        assert found is None
        return
    t = found["threshold"]  # NG when score > t
    best = max(f1_score(labels, scores > c) for c in [scores.min() - 1, *scores])
    assert f1_score(labels, scores > t) == pytest.approx(best) == pytest.approx(found["f1"])


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    png = screenshot(evaluated["out"] / "report.html", tmp_path / "shot.png", width=1000, height=900)
    with Image.open(png) as im:
        assert im.size == (1000, 900)
        px = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert px.std() > 20  # not a blank page
    assert (np.abs(px - [29, 43, 58]).sum(-1) < 10).mean() > 0.02  # the header band is drawn
