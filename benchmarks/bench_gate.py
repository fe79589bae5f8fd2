"""Where the update gate and the growth guard sit: the measurement behind their defaults.

On the demo textures (``weave``, ``dots``, and the benchmark-only ``grain``), random-initialised
backbone (``weights: none``, as the demo and the tests), for each texture:

1. a calibrated bank: built on ``--n-train`` training images, thresholds on ``--n-calibration``
   more (false-alarm rate ``--false-alarm-rate``, the demo's);
2. normalized scores (score / NG threshold) of fresh normal images and of defects (blob, scratch).
   A false alarm is a normal image above 1.0: the feedback an operator overrules, which the gate
   must let through. A defect above 1.0 is one the bank catches, which the gate must hold back.
   For each candidate multiple: the share of false alarms it absorbs and of caught defects it holds;
3. growth: the centroids a copy of the bank adds, as a fraction of its K, when updated with
   ``--n-update`` more normal images of the same texture, and with as many of each other texture
   (the wrong product's folder), which the growth guard must refuse.

Writes ``<out>/gate_<crop>_cpu.json`` with the machine and the date.

Usage: python -m benchmarks.bench_gate [--crop 224] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ocbank.jobs.update import grown_copy
from ocbank.model.detector import Detector

from .common import machine_info, make_bench_data, write_result

TEXTURES = ("weave", "dots", "grain")
MULTIPLES = (1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)


def _config(crop: int) -> dict[str, Any]:
    resize = round(crop * 256 / 224)
    return {"data": {"resize": resize, "crop": crop, "batch_size": 8, "num_workers": 0},
            "backbone": {"weights": "none"}, "bank": {"radius": "auto", "radius_images": 10},
            "decision": {"false_alarm_rate": 0.1}, "device": "cpu"}


def _files(root: Path, texture: str, split: str, kind: str) -> list[str]:
    return [str(p) for p in sorted((root / texture / split / kind).glob("*.png"))]


def _quantiles(values: np.ndarray) -> dict[str, float | None]:
    if not values.size:
        return {"n": 0, "min": None, "p10": None, "p50": None, "p90": None, "max": None}
    q = np.quantile(values, [0.1, 0.5, 0.9])
    return {"n": int(values.size), "min": float(values.min()), "p10": float(q[0]), "p50": float(q[1]),
            "p90": float(q[2]), "max": float(values.max())}


def _added_fraction(det: Detector, images: list[str]) -> float:
    """Centroids a copy of ``det``'s bank adds on ``images``, over its K (the bank itself is left alone)."""
    return (len(grown_copy(det, images).bank) - len(det.bank)) / len(det.bank)


def measure(root: Path, texture: str, crop: int, n_train: int, n_calibration: int, n_update: int) -> dict[str, Any]:
    train = _files(root, texture, "train", "good")
    det = Detector.from_config(_config(crop)).fit(train[:n_train])
    det.calibrate(train[n_train:n_train + n_calibration])
    normal = _files(root, texture, "test", "good")
    defects = _files(root, texture, "test", "blob") + _files(root, texture, "test", "scratch")
    normal_norm = det.predict(normal).normalized
    defect_norm = det.predict(defects).normalized
    false_alarms = normal_norm[normal_norm > 1.0]
    caught = defect_norm[defect_norm > 1.0]
    by_multiple = {
        f"{m:g}": {
            "false_alarms_absorbed": float((false_alarms <= m).mean()) if false_alarms.size else None,
            "caught_defects_held": float((caught > m).mean()) if caught.size else None,
            "all_defects_held": float((defect_norm > m).mean()),
        }
        for m in MULTIPLES
    }
    same = _added_fraction(det, normal[:n_update])
    other = {t: _added_fraction(det, _files(root, t, "train", "good")[:n_update]) for t in TEXTURES if t != texture}
    return {
        "k": len(det.bank),
        "radius": det.bank.radius_,
        "normal_normalized": _quantiles(normal_norm),
        "false_alarm_normalized": _quantiles(false_alarms),
        "defect_normalized": _quantiles(defect_norm),
        "caught_defect_normalized": _quantiles(caught),
        "by_multiple": by_multiple,
        "added_fraction_same_texture": same,
        "added_fraction_other_texture": other,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--n-train", type=int, default=30)
    ap.add_argument("--n-calibration", type=int, default=10)
    ap.add_argument("--n-update", type=int, default=20, help="images per growth update (same and other texture)")
    ap.add_argument("--n-test", type=int, default=20, help="fresh normal images, and defects per kind")
    ap.add_argument("--data", help="dataset folder (default: a temporary one)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        size = round(args.crop * 256 / 224)  # the images at the resize side
        root = make_bench_data(Path(args.data or tmp), TEXTURES, size, args.n_train + args.n_calibration, args.n_test)
        rows = {t: measure(root, t, args.crop, args.n_train, args.n_calibration, args.n_update) for t in TEXTURES}
    result = {"machine": machine_info(), "settings": vars(args), "textures": rows}
    path = write_result(args.out, f"gate_{args.crop}_cpu.json", result)
    for t, r in rows.items():
        fa, dn = r["false_alarm_normalized"], r["caught_defect_normalized"]
        print(f"{t:>6}: K {r['k']}; false alarms {fa['n']} (max {fa['max']}); caught defects {dn['n']} "
              f"(min {dn['min']}, p10 {dn['p10']}); added same {r['added_fraction_same_texture']:.3f} "
              f"other {r['added_fraction_other_texture']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
