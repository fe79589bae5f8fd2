"""The exported graph (ONNX in onnxruntime, OpenVINO) against Detector.predict, and the torch module."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ocbank import Detector
from ocbank.data.images import Transform, open_image
from ocbank.engine import ClusterBank
from ocbank.errors import ConfigError, DependencyError, InputError
from ocbank.model.calibration import Decision
from ocbank.model.module import AnomalyModel, BankNearest, MatmulNearest, NearestDistance
from ocbank.model.scoring import MapSpec

from .conftest import tiny_config

pytestmark = pytest.mark.slow  # export: each test builds a bank, traces the backbone or runs onnxruntime

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")


def _images(root: Path) -> list[str]:
    return [str(p) for p in sorted((Path(root) / "weave" / "test").rglob("*.png"))]


def _crops(paths: list[str]) -> np.ndarray:
    """The preprocessed input: the data Transform's uint8 RGB crop as float32 [N, 3, 64, 64] in [0, 1]."""
    t = Transform(resize=72, crop=64)
    rgb = np.stack([t.image(open_image(p))[1] for p in paths])
    return np.ascontiguousarray(rgb.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


@pytest.fixture(scope="module")
def banks(tiny_mvtec, extractor, tmp_path_factory):
    """A fitted Detector, its Python results on the test images, and its bank saved with a decision block."""
    train = sorted((Path(tiny_mvtec) / "weave" / "train" / "good").glob("*.png"))
    det = Detector.from_config(tiny_config(tiny_mvtec), extractor=extractor).fit([str(p) for p in train])
    paths = _images(tiny_mvtec)
    pred = det.predict(paths)
    scores, maps = pred.scores, pred.maps
    # Thresholds inside the observed range, so both labels and both mask values occur.
    decision = {"image_threshold": float(np.median(scores)), "pixel_threshold": float(np.median(maps)),
                "false_alarm_rate": 0.01, "n_images": 3, "source": "test", "normalization": "score / image_threshold"}
    folder = tmp_path_factory.mktemp("export")
    det.save(folder / "calibrated.h5", extra={"decision": decision})
    return {"det": det, "paths": paths, "scores": scores, "maps": maps, "decision": decision, "folder": folder}


@pytest.fixture(scope="module")
def exported(banks):
    from ocbank.cli import main

    out = banks["folder"] / "model.onnx"
    bank = str(banks["folder"] / "calibrated.h5")
    assert main(["export", "--bank", bank, "--format", "onnx", "--out", str(out)]) == 0
    return out


def _close_to_range(got: np.ndarray, want: np.ndarray, scale: float, tol: float = 1e-4) -> None:
    assert got.shape == want.shape
    err = float(np.abs(got.astype(np.float64) - want).max())
    assert err <= tol * scale, f"max error {err:.3g} exceeds {tol} x range {scale:.3g}"


@pytest.mark.parametrize("n", [1, 3])
def test_onnx_equals_detector_predict(banks, exported, n):
    idx = [3, 0, 6][:n]  # a normal image first, then defects
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    score, amap, label, normalized, mask = session.run(None, {"image": _crops([banks["paths"][i] for i in idx])})
    want_s, want_m = banks["scores"][idx], banks["maps"][idx]
    # The scale: the range of this bank's maps over the test set. The Detector's own float32 distances
    # (faiss: |q|^2 - 2 q.mu + |mu|^2 with |q| ~ 230, d ~ 15) are ~5e-4 from float64, so one normal
    # image's range (~5) would put the bar below the reference's own rounding.
    scale = float(np.ptp(banks["maps"]))
    assert scale > 0
    _close_to_range(score, want_s, scale)
    _close_to_range(amap, want_m, scale)
    # Decision outputs: exactly numpy's thresholding of the graph's own score and map ...
    thr, pix = banks["decision"]["image_threshold"], banks["decision"]["pixel_threshold"]
    np.testing.assert_array_equal(label, (score >= np.float32(thr)).astype(np.int64))
    np.testing.assert_allclose(normalized, score / np.float32(thr), rtol=1e-6)
    assert mask.dtype == np.uint8 and label.dtype == np.int64
    np.testing.assert_array_equal(mask, (amap >= np.float32(pix)).astype(np.uint8))
    # ... and of the Detector's, except within the numerical tolerance of a threshold.
    ref = Decision(thr, pix).apply(want_s, want_m)
    near = np.abs(want_m - pix) <= 1e-4 * scale
    assert np.array_equal(mask[~near], ref.mask[~near])
    assert np.array_equal(label[np.abs(want_s - thr) > 1e-4 * scale], ref.ng[np.abs(want_s - thr) > 1e-4 * scale])


def test_onnx_graph_has_dynamic_batch_metadata_and_means(banks, exported):
    model = onnx.load(str(exported))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert model.graph.input[0].name == "image" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    assert [o.name for o in model.graph.output] == ["score", "map", "label", "normalized", "mask"]
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert props["preprocess"]["resize"] == 72 and props["preprocess"]["crop"] == 64
    assert props["preprocess"]["range"] == [0.0, 1.0] and props["preprocess"]["color"] == "RGB"
    assert props["scoring"]["sigma"] == 4.0 and props["scoring"]["size"] == 64
    assert props["decision"] == banks["decision"]
    assert props["bank"]["n_centroids"] == len(banks["det"].bank)
    means = np.asarray(banks["det"].bank.means)
    shape = [1536, len(means)]
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if list(t.dims) == shape}
    assert list(stored) == ["nearest.means_t"] and np.array_equal(stored["nearest.means_t"], means.T)  # the bank, bit for bit


def test_torch_module_gemm_search_equals_the_banks_search(banks):
    """One AnomalyModel, two searches: the exportable GEMM on the means, and the bank's own (Detector.predict's)."""
    det = banks["det"]
    model = AnomalyModel(det.extractor, MatmulNearest(det.bank.means), MapSpec(64, 4.0))
    assert model.output_names == ("score", "map")
    assert isinstance(det.scorer.nearest, BankNearest) and det.scorer.nearest.bank is det.bank
    x = torch.from_numpy(_crops(banks["paths"][:2]))
    with torch.inference_mode():
        out = model(x)
        via_bank = det.scorer(x)
    assert len(out) == 2
    scale = float(np.ptp(banks["maps"]))
    _close_to_range(out[0].numpy(), banks["scores"][:2], scale)
    _close_to_range(out[1].numpy(), banks["maps"][:2], scale)
    _close_to_range(via_bank[0].numpy(), banks["scores"][:2], scale)  # the bank's search, whole-image forward
    _close_to_range(via_bank[1].numpy(), banks["maps"][:2], scale)


class _TinyExtractor(torch.nn.Module):
    """Stand-in with FeatureExtractor's parts (stride 8 and 16, 8 + 8 channels): exports in seconds."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU())
        self.layer2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.layer3 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.pool = "avg3"


def test_onnx_external_data_same_results(tmp_path):
    """external_data=True (automatic beyond 2 GB): weights beside the graph, same outputs as torch."""
    from ocbank.model.export import export_onnx

    means = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    model = AnomalyModel(_TinyExtractor(), MatmulNearest(means), MapSpec(32, 1.0), Decision(1.0, 1.0))
    out = export_onnx(model, tmp_path / "m.onnx", {"k": "1"}, external_data=True)
    assert (tmp_path / "m.onnx.data").stat().st_size >= means.nbytes
    x = np.random.default_rng(1).random((3, 3, 32, 32)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    with torch.inference_mode():
        want = model(torch.from_numpy(x))
    assert len(got) == 5
    scale = float(np.ptp(want[1].numpy()))
    _close_to_range(got[0], want[0].numpy(), scale)
    _close_to_range(got[1], want[1].numpy(), scale)


@pytest.mark.parametrize("search", ["gemm", "bank"])
def test_module_distances_are_brute_force_nearest(extractor, search):
    """Both searches give the exact 1-NN distance (float64 cdist), and ~0 for a centroid itself."""
    rng = np.random.default_rng(0)
    means = (rng.standard_normal((50, 1536)) * 3).astype(np.float32)
    if search == "gemm":
        nearest: NearestDistance = MatmulNearest(means)
    else:
        bank = ClusterBank(1536, 1.0)  # centroids ~170 apart: each mean stays its own centroid
        bank.add(means)
        assert len(bank) == 50
        nearest = BankNearest(bank)
    model = AnomalyModel(extractor, nearest, MapSpec(64, 4.0))
    q = torch.from_numpy(means[rng.integers(0, 50, 12)] + rng.standard_normal((12, 1536)).astype(np.float32))
    want = torch.cdist(q.double(), torch.from_numpy(means).double()).min(1).values
    got = model.distances(q.view(1, 3, 4, 1536))
    assert got.shape == (1, 3, 4)
    np.testing.assert_allclose(got.reshape(-1).numpy(), want.numpy(), rtol=1e-4)
    exact = model.distances(torch.from_numpy(means[:3]).view(1, 1, 3, 1536))
    assert float(exact.max()) < 1e-2 * float(want.min())  # a centroid itself: ~0, never NaN from a negative d^2


def test_module_refuses_bad_settings(extractor):
    means = np.ones((2, 1536), np.float32)
    with pytest.raises(ConfigError, match="scoring.sigma"):
        AnomalyModel(extractor, MatmulNearest(means), MapSpec(64, -4.0))
    with pytest.raises(ConfigError, match="multiple of the stride 8"):
        AnomalyModel(extractor, MatmulNearest(means), MapSpec(60, 1.0))
    with pytest.raises(InputError, match="NearestDistance"):
        AnomalyModel(extractor, means, MapSpec(64, 1.0))  # the means themselves are not a search
    with pytest.raises(InputError, match="non-empty"):
        MatmulNearest(np.zeros((0, 1536), np.float32))
    with pytest.raises(ConfigError, match="image_threshold"):
        Decision(float("nan"), 1.0)
    with pytest.raises(ConfigError, match="lacks"):
        Decision.from_dict({"image_threshold": 1.0})


def test_export_format_and_missing_openvino(banks, monkeypatch):
    from ocbank.model.export import export

    bank = banks["folder"] / "calibrated.h5"
    with pytest.raises(ConfigError, match="tflite"):
        export(bank, banks["folder"] / "m.x", "tflite")
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(DependencyError, match=r"ocbank\[openvino\]"):
        export(bank, banks["folder"] / "m.xml", "openvino")


def test_openvino_equals_onnx(banks, exported, tmp_path):
    ov = pytest.importorskip("openvino")
    from ocbank.model.export import OPENVINO_COMPILE_CONFIG, export

    out = export(banks["folder"] / "calibrated.h5", tmp_path / "model.xml", "openvino")
    compiled = ov.Core().compile_model(str(out), "CPU", OPENVINO_COMPILE_CONFIG)
    x = _crops(banks["paths"][:3])
    res = compiled(x)
    got = [res[compiled.output(i)] for i in range(5)]
    want = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    scale = float(np.ptp(want[1]))
    _close_to_range(got[0], want[0], scale)
    _close_to_range(got[1], want[1], scale)
    info = ov.Core().read_model(str(out)).get_rt_info(["ocbank", "decision"]).astype(str)
    assert json.loads(info) == banks["decision"]
