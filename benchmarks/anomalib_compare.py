"""PatchCore and OCBank side by side in anomalib's own terms: Engine.fit and Engine.test on one datamodule.

    python -m benchmarks.anomalib_compare --out benchmarks/results

One anomalib ``Folder`` datamodule over a texture class of the demo's synthetic data
(:mod:`ocbank.synthetic`), the same geometry for every model (resize 146, center crop 128),
and three models: anomalib's ``Patchcore`` with coreset ratios 0.1 and 0.01 and ocbank's
``OCBank(radius="auto")``. Each model runs in its own process, so peak RSS is its own.
Reported per model: fit time (train epoch + memory-bank fit, i.e. until the first validation
batch), peak RSS (and peak VRAM on CUDA), bank size, image and pixel AUROC from anomalib's
evaluator (on post-processed scores), the same AUROCs from scikit-learn on the raw scores
(the cross-check against torchmetrics' sigmoid on raw distances, which reads 0.5), and test img/s.

No weights can be downloaded here: ``Patchcore(pre_trained=False)`` is timm's randomly
initialised wide_resnet50_2, ``OCBank(weights="none")`` ocbank's seeded random one. The
AUROCs are those of random features; the fit time and memory comparison does not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may try to download weights
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

MODELS = ("patchcore_10", "patchcore_1", "ocbank")
# 128 px crops (a 16 x 16 patch grid) keep PatchCore's greedy coreset (its time grows with the
# patch count times the coreset size) to a few minutes on two CPU cores with 60 training images.
RESIZE, CROP = 146, 128


def _rss_mb() -> float:
    """This process's current resident set size in MiB (from /proc; Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _datamodule(root: Path, batch: int) -> Any:
    from anomalib.data import Folder

    from ocbank.synthetic import DEFECTS

    return Folder(
        name=root.name,
        root=root,
        normal_dir="train/good",
        abnormal_dir=[f"test/{d}" for d in DEFECTS],
        normal_test_dir="test/good",
        mask_dir=[f"ground_truth/{d}" for d in DEFECTS],
        train_batch_size=batch,
        eval_batch_size=batch,
        num_workers=0,
        seed=0,
    )


def _model(name: str) -> Any:
    if name == "ocbank":
        from ocbank.integrations.anomalib import OCBank

        return OCBank(radius="auto", weights="none", image_size=CROP, resize=RESIZE, visualizer=False)
    from anomalib.models import Patchcore

    ratio = {"patchcore_10": 0.1, "patchcore_1": 0.01}[name]
    pre = Patchcore.configure_pre_processor(image_size=(RESIZE, RESIZE), center_crop_size=(CROP, CROP))
    return Patchcore(pre_trained=False, coreset_sampling_ratio=ratio, pre_processor=pre, visualizer=False)


def _bank_size(model: Any) -> dict[str, Any]:
    if hasattr(model.model, "memory_bank"):
        bank = model.model.memory_bank
        return {"bank_rows": int(bank.shape[0]), "bank_bytes": int(bank.numel() * bank.element_size())}
    bank = model.detector.bank
    return {"bank_rows": len(bank), "bank_bytes": int(bank.nbytes)}


def _guard(max_rss_gb: float, phase: list[str]) -> None:
    """Abort this process (exit 3, the phase on stderr) when its RSS passes ``max_rss_gb``: the machine is shared."""
    import threading

    def watch() -> None:
        while True:
            if _rss_mb() > max_rss_gb * 1024:
                print(f"ABORTED rss above {max_rss_gb} GB during {phase[0]}", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def run_one(name: str, data: Path, batch: int, max_rss_gb: float) -> dict[str, Any]:
    """Fit and test one model in this process; return its figures."""
    import numpy as np
    import torch
    from anomalib.engine import Engine
    from lightning.pytorch import Callback
    from sklearn.metrics import roc_auc_score

    class Probe(Callback):
        """Times and memory around the fit, and the raw test outputs before the post-processor."""

        def __init__(self) -> None:
            self.marks: dict[str, float] = {}
            self.scores: list[np.ndarray] = []
            self.labels: list[np.ndarray] = []
            self.pixels: list[np.ndarray] = []
            self.masks: list[np.ndarray] = []

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            phase[0] = "fit"
            self.marks.update(train_start=time.perf_counter(), rss_before_fit_mb=_rss_mb())

        def on_validation_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if "fit_end" not in self.marks and "train_start" in self.marks:  # the bank is built by now
                self.marks.update(fit_end=time.perf_counter(), peak_rss_fit_mb=_peak_rss_mb())
                phase[0] = "validation"

        def on_test_start(self, trainer: Any, pl_module: Any) -> None:
            phase[0] = "test"
            self.marks["test_start"] = time.perf_counter()

        def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *args: Any) -> None:
            # Callbacks given to the Engine run before the model's own post-processor: these are raw.
            self.scores.append(outputs.pred_score.detach().float().cpu().numpy().ravel())
            self.labels.append(outputs.gt_label.detach().cpu().numpy().ravel())
            self.pixels.append(outputs.anomaly_map.detach().float().cpu().numpy().reshape(-1))
            self.masks.append(outputs.gt_mask.detach().cpu().numpy().reshape(-1))

        def on_test_end(self, trainer: Any, pl_module: Any) -> None:
            self.marks["test_end"] = time.perf_counter()

    phase = ["setup"]
    _guard(max_rss_gb, phase)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    probe = Probe()
    datamodule = _datamodule(data, batch)
    model = _model(name)
    with tempfile.TemporaryDirectory() as project:
        engine = Engine(logger=False, default_root_dir=project, enable_progress_bar=False, callbacks=[probe])
        engine.fit(model=model, datamodule=datamodule)
        metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    scores, labels = np.concatenate(probe.scores), np.concatenate(probe.labels)
    pixels, masks = np.concatenate(probe.pixels), np.concatenate(probe.masks)
    n_test = len(scores)
    m = probe.marks
    return {
        "model": name,
        "fit_seconds": m["fit_end"] - m["train_start"],
        "rss_before_fit_mb": m["rss_before_fit_mb"],
        "peak_rss_fit_mb": m["peak_rss_fit_mb"],
        "peak_vram_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        **_bank_size(model),
        "image_auroc_anomalib": float(metrics["image_AUROC"]),
        "pixel_auroc_anomalib": float(metrics["pixel_AUROC"]),
        "image_auroc_sklearn_raw": float(roc_auc_score(labels, scores)),
        "pixel_auroc_sklearn_raw": float(roc_auc_score(masks > 0, pixels)),
        "raw_score_range": [float(scores.min()), float(scores.max())],
        "n_test_images": n_test,
        "test_images_per_second": n_test / (m["test_end"] - m["test_start"]),
        "n_train_images": len(datamodule.train_data),
        "peak_rss_mb": _peak_rss_mb(),
        "load_avg_at_end": list(os.getloadavg()),
        "post_processor_image_range": [float(model.post_processor.image_min), float(model.post_processor.image_max)],
    }


def _child(name: str, data: Path, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """Run one model in a fresh process; its RESULT line, or the RSS guard's abort as a row."""
    cmd = [sys.executable, "-m", "benchmarks.anomalib_compare", "--one", name, "--data", str(data),
           "--batch", str(args.batch), "--max-rss-gb", str(args.max_rss_gb)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode == 3:  # the RSS guard: a result in itself
        aborted = re.findall(r"ABORTED[^\r\n]*", proc.stderr)
        row = {"model": name, "aborted": aborted[-1] if aborted else "rss guard"}
    else:
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stderr[-4000:], file=sys.stderr)
            msg = f"{name} failed with exit code {proc.returncode}. See the error above."
            raise SystemExit(msg)
        row = json.loads(line[-1][len("RESULT "):])
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder for anomalib_compare_<device>.json")
    ap.add_argument("--data", default=None, help="dataset folder (default: a temporary one)")
    ap.add_argument("--texture", default="weave", help="texture class of ocbank.synthetic")
    ap.add_argument("--n-train", type=int, default=60)
    ap.add_argument("--n-good-test", type=int, default=30)
    ap.add_argument("--n-defect-test", type=int, default=15, help="per defect type")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--max-rss-gb", type=float, default=8.0, help="abort a model whose process passes this RSS")
    ap.add_argument("--malloc-mmap-threshold", default="default,131072",
                    help="comma-separated runs: 'default' (glibc as is) or MALLOC_MMAP_THRESHOLD_ in bytes")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: run one model, print JSON
    args = ap.parse_args(argv)

    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, Path(args.data), args.batch, args.max_rss_gb)))
        return 0

    import torch

    from benchmarks.common import machine_info
    from ocbank.jsonio import write_json
    from ocbank.synthetic import make_dataset

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data or tmp)
        make_dataset(root, classes=(args.texture,), n_train=args.n_train, n_good_test=args.n_good_test,
                     n_defect_test=args.n_defect_test, seed=0)
        runs = []
        for threshold in args.malloc_mmap_threshold.split(","):
            env = dict(os.environ)
            if threshold != "default":
                env["MALLOC_MMAP_THRESHOLD_"] = threshold
            rows = [_child(name, root / args.texture, args, env) for name in args.models.split(",")]
            runs.append({"malloc_mmap_threshold": threshold, "rows": rows})
    result = {
        "machine": machine_info(device, note="shared machine (other jobs running); models run one after another, "
                                              "each in its own process"),
        "weights": "random: no download is possible here. Patchcore(pre_trained=False) uses timm's random "
                   "wide_resnet50_2 init; OCBank(weights='none') ocbank's seeded random init",
        "data": {"source": "ocbank.synthetic", "texture": args.texture, "n_train": args.n_train,
                 "n_good_test": args.n_good_test, "n_defect_test_per_type": args.n_defect_test,
                 "split": "anomalib Folder: validation = half of the test folder (val_split_mode from_test)"},
        "geometry": {"resize": RESIZE, "crop": CROP},
        "batch_size": args.batch,
        "auroc_note": "anomalib columns: its Evaluator on post-processed (min-max normalised, clamped) scores; "
                      "sklearn columns: roc_auc_score on the raw scores of the same test batches",
        "malloc_note": "glibc's dynamic mmap threshold keeps freed large temporaries in the heap; PatchCore's greedy "
                       "coreset allocates one [n_patches, proj_dim] temporary per iteration, so its RSS can grow by "
                       "that much per iteration. 'default' is glibc as installed; a number fixes "
                       "MALLOC_MMAP_THRESHOLD_ (bytes) for every model's process. A row with 'aborted' passed the "
                       "--max-rss-gb guard (the machine is shared) during the named phase.",
        "runs": runs,
    }
    write_json(Path(args.out) / f"anomalib_compare_{device}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
