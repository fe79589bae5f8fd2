"""ocbank inside anomalib: OCBank scores like Detector, converts banks both ways, exports to ONNX.

All models use weights "none" (a random, seeded WideResNet-50: no download is possible
here) on the tiny synthetic dataset; the claims are about equality of the two paths,
which holds for any weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IMAGE_SIZE = 64  # crop; the resize is round(64 * 256 / 224) = 73, so images really are resized
RADIUS_IMAGES = 4  # of 6 training images, fed in batches of 3: the sample ends inside a batch


@pytest.fixture(scope="module")
def anomalib_api():
    return pytest.importorskip("anomalib")


def _folder(root: Path, batch: int = 3):
    from anomalib.data import Folder

    return Folder(
        name="weave",
        root=root,
        normal_dir="train/good",
        abnormal_dir=["test/blob", "test/scratch"],
        normal_test_dir="test/good",
        mask_dir=["ground_truth/blob", "ground_truth/scratch"],
        train_batch_size=batch,
        eval_batch_size=batch,
        num_workers=0,
        seed=0,
    )


def _engine(root: Path):
    from anomalib.engine import Engine

    return Engine(logger=False, default_root_dir=root, enable_progress_bar=False, accelerator="cpu", devices=1)


@pytest.fixture(scope="module")
def fitted(anomalib_api, tiny_mvtec, tmp_path_factory):
    """OCBank fitted by anomalib's Engine on the weave class, training images in file order."""
    from torch.utils.data import DataLoader

    from ocbank.integrations.anomalib import OCBank

    root = tiny_mvtec / "weave"
    dm = _folder(root)
    dm.setup()
    train = DataLoader(dm.train_data, batch_size=3, shuffle=False, collate_fn=dm.train_data.collate_fn)
    model = OCBank(weights="none", image_size=IMAGE_SIZE, radius_images=RADIUS_IMAGES, visualizer=False)
    engine = _engine(tmp_path_factory.mktemp("anomalib_project"))
    engine.fit(model=model, train_dataloaders=train, val_dataloaders=dm.val_dataloader())
    return model, dm, engine, sorted((root / "train" / "good").glob("*.png"))


def _raw_scores(model, dataset) -> tuple[list[str], np.ndarray, np.ndarray]:
    """OCBank's raw outputs on anomalib's decoded images, by test_step's path (pre-processor, then the model)."""
    import torch

    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([item.image for item in items])
    model.eval()
    with torch.no_grad():
        pred = model.model(model.pre_processor.transform(images))
    return [str(item.image_path) for item in items], pred.pred_score.numpy(), pred.anomaly_map[:, 0].numpy()


@pytest.mark.slow
def test_scores_equal_detector_predict(fitted):
    """Engine.fit + OCBank gives Detector's radius, bank and scores on the same images and weights."""
    from ocbank.model.detector import Detector

    model, dm, _, train_files = fitted
    kwargs = {"weights": "none", "image_size": IMAGE_SIZE}
    # One seeded radius-sample rule: both fit the same RADIUS_IMAGES of the 6 first, then the rest in order.
    auto = Detector(radius="auto", radius_images=RADIUS_IMAGES, **kwargs).fit(train_files)
    assert model.detector.bank.radius_ == pytest.approx(auto.bank.radius_, rel=1e-4)
    assert model.detector.radius_stats_.n_images == auto.radius_stats_.n_images == RADIUS_IMAGES
    assert len(model.detector.bank) == len(auto.bank)
    assert model.detector.bank.n_seen == auto.bank.n_seen == len(train_files) * (IMAGE_SIZE // 8) ** 2

    paths, scores, maps = _raw_scores(model, dm.test_data)
    ref = auto.predict(paths)
    span = float(ref.maps.max() - ref.maps.min())
    assert span > 0
    np.testing.assert_allclose(scores, ref.scores, rtol=0, atol=1e-4 * span)
    np.testing.assert_allclose(maps, ref.maps, rtol=0, atol=1e-4 * span)


@pytest.mark.slow
def test_the_radius_sample_is_seeded_not_the_first_images_to_arrive(fitted, tmp_path):
    """A shuffled loader brings the images in another order: the seeded sample, and so r, stay the same,
    and each sampled image still enters the bank once."""
    import torch
    from torch.utils.data import DataLoader

    from ocbank.integrations.anomalib import OCBank

    model, dm, _, train_files = fitted
    shuffled = DataLoader(dm.train_data, batch_size=2, shuffle=True, collate_fn=dm.train_data.collate_fn,
                          generator=torch.Generator().manual_seed(7))
    again = OCBank(weights="none", image_size=IMAGE_SIZE, radius_images=RADIUS_IMAGES, visualizer=False)
    _engine(tmp_path).fit(model=again, train_dataloaders=shuffled)
    assert again.detector.bank.radius_ == pytest.approx(model.detector.bank.radius_, rel=1e-5)
    assert again.detector.bank.n_seen == model.detector.bank.n_seen == len(train_files) * (IMAGE_SIZE // 8) ** 2


@pytest.mark.slow
def test_a_second_fit_on_the_same_engine_streams_its_images(anomalib_api, tiny_mvtec, tmp_path):
    """Engine.fit twice on one Engine: the second fit's images enter the bank too (its epoch is not skipped)."""
    from torch.utils.data import DataLoader

    from ocbank.integrations.anomalib import OCBank

    dm = _folder(tiny_mvtec / "weave")
    dm.setup()
    model = OCBank(weights="none", image_size=IMAGE_SIZE, radius_images=RADIUS_IMAGES, visualizer=False)
    engine = _engine(tmp_path)
    per_pass = len(dm.train_data) * (IMAGE_SIZE // 8) ** 2  # patch vectors of one pass over the training images
    for n_fits in (1, 2):
        train = DataLoader(dm.train_data, batch_size=3, shuffle=False, collate_fn=dm.train_data.collate_fn)
        engine.fit(model=model, train_dataloaders=train, val_dataloaders=dm.val_dataloader())
        assert model.detector.bank.n_seen == n_fits * per_pass
        assert int(model.model.n_seen) == n_fits * per_pass  # published: what prediction and checkpoints use


@pytest.mark.slow
def test_evaluator_auroc_matches_sklearn_on_raw_scores(fitted):
    """Engine.test's image AUROC (post-processed scores) agrees with scikit-learn's on the raw scores.

    Guards the torchmetrics pitfall: raw distances fed to its AUROC are squashed by a
    sigmoid to 1.0 and give 0.5; the post-processor's normalisation must be active.
    """
    from sklearn.metrics import roc_auc_score

    model, dm, engine, _ = fitted
    assert np.isfinite(float(model.post_processor.image_min))  # set by the validation run
    result = engine.test(model=model, datamodule=dm, verbose=False)[0]
    _, scores, _ = _raw_scores(model, dm.test_data)
    labels = [int(dm.test_data[i].gt_label) for i in range(len(dm.test_data))]
    raw = roc_auc_score(labels, scores)
    # Clamping to [0, 1] outside the validation range can only tie scores, so only lower AUROC by ties.
    assert result["image_AUROC"] == pytest.approx(raw, abs=0.15)
    assert result["image_AUROC"] != 0.5 or raw == 0.5


@pytest.mark.slow
def test_lightning_checkpoint_restores_the_bank(fitted, tmp_path):
    """The checkpoint Engine.fit wrote loads into a fresh OCBank (weights_only) with the same bank."""
    from ocbank.engine.checkpoint import read_bank
    from ocbank.integrations.anomalib import OCBank

    model, _, engine, _ = fitted
    ckpt = engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    assert ckpt and Path(ckpt).is_file()
    restored = OCBank.load_from_checkpoint(ckpt)
    model.to_bank(tmp_path / "fitted.h5")
    restored.to_bank(tmp_path / "restored.h5")
    a, b = read_bank(tmp_path / "fitted.h5"), read_bank(tmp_path / "restored.h5")
    np.testing.assert_array_equal(a.means, b.means)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.m2, b.m2)
    assert (a.radius, a.n_seen) == (b.radius, b.n_seen)
    assert a.metadata["config"] == b.metadata["config"]
    assert a.metadata["radius_stats"] == b.metadata["radius_stats"]


@pytest.fixture(scope="module")
def bank_file(anomalib_api, tiny_mvtec, tmp_path_factory) -> Path:
    """A bank as `ocbank build` writes it (Detector.save), calibrated, from the weave class."""
    from ocbank.model.detector import Detector

    root = tiny_mvtec / "weave"
    det = Detector(weights="none", image_size=IMAGE_SIZE, radius="auto", max_centroids=40)
    det.fit(sorted((root / "train" / "good").glob("*.png")))
    det.calibrate(sorted((root / "test" / "good").glob("*.png")))
    path = tmp_path_factory.mktemp("banks") / "weave.h5"
    det.save(path)
    return path


@pytest.mark.slow
def test_from_bank_to_bank_round_trip_exactly(bank_file, tmp_path, tiny_mvtec):
    """from_bank then to_bank keeps means, counts, m2, radius, cap history, config and thresholds; update takes it."""
    from ocbank.engine.checkpoint import read_bank
    from ocbank.integrations.anomalib import OCBank
    from ocbank.jobs.update import UpdateJob, update_bank
    from ocbank.model.detector import Detector

    model = OCBank.from_bank(bank_file, visualizer=False)
    out = tmp_path / "back.h5"
    model.to_bank(out)
    a, b = read_bank(bank_file), read_bank(out)
    assert a.radius_history, "the cap of 40 centroids should have raised the radius"
    np.testing.assert_array_equal(a.means, b.means)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.m2, b.m2)
    assert (a.radius, a.n_seen, a.max_centroids, a.radius_history) == (b.radius, b.n_seen, b.max_centroids, b.radius_history)
    for key in ("config", "backbone", "radius_stats", "decision", "image_size"):
        assert a.metadata[key] == b.metadata[key], key
    # ocbank's own tools take the file back: predict (Detector.load) and update.
    assert np.array_equal(Detector.load(out).predict(sorted((tiny_mvtec / "weave" / "test" / "blob").glob("*.png"))).scores,
                          Detector.load(bank_file).predict(sorted((tiny_mvtec / "weave" / "test" / "blob").glob("*.png"))).scores)
    summary = update_bank(UpdateJob(bank=str(out), inputs=(str(tiny_mvtec / "weave" / "test" / "good"),),
                                    out=str(tmp_path / "u.h5"), gate="off"))  # the file, not the gate, is tested
    assert summary["images_added"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nn", "local_mean", "local_gauss"])
def test_from_bank_scores_like_the_bank(bank_file, tiny_mvtec, tmp_path, mode):
    """OCBank.from_bank(file) scores anomalib-decoded images as Detector.load(file).predict scores the files,
    in every scoring mode: one AnomalyModel, searching by GEMM on the means (adapter) or the bank (Detector)."""
    import dataclasses

    from ocbank.integrations.anomalib import OCBank
    from ocbank.model.detector import Detector

    if mode != "nn":
        det = Detector.load(bank_file)
        det.config = dataclasses.replace(det.config, scoring=dataclasses.replace(det.config.scoring, mode=mode))
        bank_file = tmp_path / f"{mode}.h5"
        det.save(bank_file)
    model = OCBank.from_bank(bank_file, visualizer=False)
    assert model.model.scorer.score.mode == mode
    dm = _folder(tiny_mvtec / "weave")
    dm.setup()
    paths, scores, maps = _raw_scores(model, dm.test_data)
    ref = Detector.load(bank_file).predict(paths)
    span = float(ref.maps.max() - ref.maps.min())
    np.testing.assert_allclose(scores, ref.scores, rtol=0, atol=1e-4 * span)
    np.testing.assert_allclose(maps, ref.maps, rtol=0, atol=1e-4 * span)


def test_export_resize_is_within_one_level_of_ocbank_resize(anomalib_api):
    """The exported graph's resize (torch, antialiased) stays within one 8-bit level of ocbank's PIL resize."""
    import torch

    from ocbank.integrations.anomalib import ExportResizeCrop, ResizeCrop

    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 80, 90)).astype(np.float32) / 255)
    pil = ResizeCrop(73, 64)(images)
    traced = ExportResizeCrop(73, 64)(images)
    assert pil.shape == traced.shape == (2, 3, 64, 64)
    assert float((pil - traced).abs().max()) <= 1 / 255 + 1e-6
    masks = torch.zeros(2, 80, 90, dtype=torch.bool)
    masks[:, 30:50, 40:60] = True
    out, out_masks = ResizeCrop(73, 64)(images, masks)
    assert out_masks.shape == (2, 64, 64) and out_masks.dtype == torch.bool and out_masks.any()


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime_and_anomalib_inferencer(bank_file, tiny_mvtec, tmp_path, monkeypatch):
    """Engine.export(ONNX) of OCBank: onnxruntime and anomalib's OpenVINOInferencer (which reads .onnx) match torch."""
    import torch
    from anomalib.data.utils import read_image
    from anomalib.deploy import ExportType

    from ocbank.integrations.anomalib import OCBank

    ort = pytest.importorskip("onnxruntime")
    model = OCBank.from_bank(bank_file, visualizer=False)
    dm = _folder(tiny_mvtec / "weave")
    engine = _engine(tmp_path / "project")
    engine.validate(model=model, datamodule=dm, verbose=False)  # the post-processor's normalisation and thresholds
    onnx_file = engine.export(model=model, export_type=ExportType.ONNX, export_root=tmp_path / "export")
    assert onnx_file.suffix == ".onnx"

    files = sorted((tiny_mvtec / "weave" / "test" / "blob").glob("*.png"))
    image = torch.stack([read_image(f, as_tensor=True) for f in files])
    model.eval()
    with torch.no_grad():
        expected = model(image)  # AnomalibModule.forward: the exported graph's own torch path
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {session.get_inputs()[0].name: image.numpy()})))
    # Normalised outputs; 1e-3 of their range: an input pixel may round to the other 8-bit level
    # (antialiased resize in torch vs onnxruntime), which moves the maps by ~1e-4 of it.
    span = float(expected.anomaly_map.max() - expected.anomaly_map.min())
    np.testing.assert_allclose(got["pred_score"], expected.pred_score.numpy(), rtol=0, atol=1e-3 * span)
    np.testing.assert_allclose(got["anomaly_map"], expected.anomaly_map.numpy(), rtol=0, atol=1e-3 * span)
    assert np.array_equal(got["pred_label"], expected.pred_label.numpy())

    pytest.importorskip("openvino")
    from anomalib.deploy import OpenVINOInferencer

    from ocbank.model.export import OPENVINO_COMPILE_CONFIG

    monkeypatch.chdir(tmp_path)  # the inferencer writes an openvino_cache folder into the working directory
    inferencer = OpenVINOInferencer(onnx_file, device="CPU", config=OPENVINO_COMPILE_CONFIG)
    for i, f in enumerate(files):
        pred = inferencer.predict(f)
        np.testing.assert_allclose(np.ravel(pred.pred_score), got["pred_score"][i : i + 1], rtol=0, atol=1e-3 * span)
        np.testing.assert_allclose(pred.anomaly_map.reshape(got["anomaly_map"][i].shape), got["anomaly_map"][i], rtol=0, atol=1e-3 * span)


@pytest.mark.slow
def test_torch_export_runs_in_anomalib_torch_inferencer(bank_file, tiny_mvtec, tmp_path, monkeypatch):
    """Engine.export(TORCH) pickles the whole module (the bank rebuilt on load); TorchInferencer scores as the model."""
    import torch
    from anomalib.data.utils import read_image
    from anomalib.deploy import ExportType, TorchInferencer

    from ocbank.integrations.anomalib import OCBank

    model = OCBank.from_bank(bank_file, visualizer=False)
    pt_file = _engine(tmp_path / "project").export(model=model, export_type=ExportType.TORCH,
                                                   export_root=tmp_path / "export")
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # anomalib's opt-in to unpickle a .pt file: our own, just written
    inferencer = TorchInferencer(pt_file, device="cpu")
    loaded = inferencer.model
    np.testing.assert_array_equal(loaded.model.detector.bank.counts, model.detector.bank.counts)
    image_file = sorted((tiny_mvtec / "weave" / "test" / "scratch").glob("*.png"))[0]
    model.eval()
    with torch.no_grad():
        want = model(read_image(image_file, as_tensor=True)[None])
    got = inferencer.predict(image_file)
    np.testing.assert_allclose(got.pred_score.detach().numpy().ravel(), want.pred_score.numpy(), rtol=1e-6)


def test_unfitted_model_and_unexportable_modes_refuse(anomalib_api, tmp_path):
    """No bank: forward and to_bank refuse by name; a grid scoring mode refuses ONNX export before tracing."""
    import torch

    from ocbank.errors import ConfigError, NotFittedError
    from ocbank.integrations.anomalib import OCBank

    model = OCBank(weights="none", image_size=IMAGE_SIZE, scoring_mode="local_mean", visualizer=False)
    with pytest.raises(NotFittedError, match="no bank"):
        model.model(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(NotFittedError, match="no bank"):
        model.to_bank(tmp_path / "x.h5")
    with pytest.raises(ConfigError, match="local_mean"):
        model.to_onnx(tmp_path)
    assert not (tmp_path / "x.h5").exists()


def test_a_state_dict_from_before_the_search_was_a_submodule_loads(anomalib_api):
    """Checkpoints that hold the means at scorer.means_t (not scorer.nearest.means_t) restore the same bank."""
    from types import SimpleNamespace

    import torch

    from ocbank.integrations.anomalib import OCBankModel
    from ocbank.model.detector import Detector

    no_backbone = SimpleNamespace(stem=torch.nn.Identity(), layer2=torch.nn.Identity(), layer3=torch.nn.Identity(), pool="none")
    det = Detector(weights="none", image_size=IMAGE_SIZE, radius=2.0, extractor=no_backbone)
    model = OCBankModel(det)
    means = (np.random.default_rng(0).standard_normal((5, 1536)) * 10).astype(np.float32)
    old = {"counts": torch.ones(5, dtype=torch.int64), "m2": torch.zeros(5, dtype=torch.float64),
           "radius": torch.tensor(2.0, dtype=torch.float64), "n_seen": torch.tensor(5),
           "scorer.means_t": torch.from_numpy(means.T.copy()), "scorer.means_sq": torch.from_numpy((means**2).sum(1))}
    model.load_state_dict(old)  # strict: an unmapped old key would be refused as unexpected
    assert torch.equal(model.scorer.nearest.means_t, old["scorer.means_t"])
    np.testing.assert_array_equal(det.bank.means, means)
    assert det.bank.n_seen == 5 and det.bank.radius == 2.0


def test_import_ocbank_works_without_anomalib():
    """ocbank and its Detector import without touching anomalib; with anomalib unimportable the adapter names the extra."""
    code = (
        "import sys\n"
        "import ocbank, ocbank.integrations\n"
        "from ocbank.model.detector import Detector\n"
        "assert 'anomalib' not in sys.modules, 'import ocbank imported anomalib'\n"
        "sys.modules['anomalib'] = None  # as if it were not installed\n"
        "try:\n"
        "    import ocbank.integrations.anomalib\n"
        "except ImportError as exc:\n"
        "    assert 'ocbank[anomalib]' in str(exc), exc\n"
        "    print('refused')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "refused"


@pytest.mark.slow
def test_a_restored_bank_keeps_the_configs_search_options_and_checks_its_thresholds(bank_file):
    """restore_bank builds the bank as Detector.load does: every search option, and a bad decision is named."""
    from ocbank.errors import ConfigError
    from ocbank.integrations.anomalib import OCBank

    model = OCBank.from_bank(bank_file, visualizer=False).model
    extras = model.extras()
    extras["config"]["bank"].update(gpu_search="torch", gpu_search_precision="bf16")
    model.checkpoint_extras = extras
    model.restore_bank()
    assert model.detector.bank_.search_backend["search"] == "torch"
    assert model.detector.bank_.search_backend["precision"] == "bf16"
    model.checkpoint_extras = {**extras, "decision": {"image_threshold": 1.0}}  # no pixel threshold
    with pytest.raises(ConfigError, match="Recalibrate"):
        model.restore_bank()


def test_ocbank_hyperparameters_are_config_fields_with_config_defaults(anomalib_api):
    """OCBank keeps its explicit signature (anomalib's CLI reads it); each is a Config field with its default."""
    import inspect

    from ocbank.config import PARAMETERS, Config, parameters_of
    from ocbank.integrations.anomalib import OCBank

    components = {"pre_processor", "post_processor", "evaluator", "visualizer"}
    signature = inspect.signature(OCBank.__init__).parameters
    names = [n for n in signature if n not in components | {"self"}]
    assert set(names) <= set(PARAMETERS)
    defaults = parameters_of(Config())
    for name in names:
        assert signature[name].default == (None if name == "resize" else defaults[name]), name
    model = OCBank(weights="none", radius=0.5, image_size=64, seed=4, sigma=1.0, visualizer=False)
    assert parameters_of(model.detector.config, ["weights", "radius", "image_size", "seed", "sigma"]) == {
        "weights": "none", "radius": 0.5, "image_size": 64, "seed": 4, "sigma": 1.0}


def test_radius_auto_refuses_a_loader_it_cannot_sample_by_position(anomalib_api, tmp_path):
    """The seeded radius sample is drawn by position: an iterable dataset is refused by name, not sampled some other way."""
    from torch.utils.data import DataLoader, IterableDataset

    from ocbank.errors import ConfigError
    from ocbank.integrations.anomalib import OCBank

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(())

    model = OCBank(weights="none", image_size=IMAGE_SIZE, radius_images=RADIUS_IMAGES, visualizer=False)
    with pytest.raises(ConfigError, match="radius='auto' draws its seeded sample.*got a training loader over Stream"):
        _engine(tmp_path).fit(model=model, train_dataloaders=DataLoader(Stream(), batch_size=None))
    assert not model.detector.is_fitted


@pytest.mark.slow
def test_a_validation_inside_the_epoch_scores_so_far_and_the_fit_goes_on(fitted, tmp_path):
    """val_check_interval=0.5 validates after the first of two batches: the bank seen so far is published,
    the epoch then streams on, and every image (the radius sample included) enters once."""
    from anomalib.engine import Engine
    from torch.utils.data import DataLoader

    from ocbank.integrations.anomalib import OCBank

    model, dm, _, train_files = fitted
    train = DataLoader(dm.train_data, batch_size=3, shuffle=False, collate_fn=dm.train_data.collate_fn)
    again = OCBank(weights="none", image_size=IMAGE_SIZE, radius_images=RADIUS_IMAGES, visualizer=False)
    engine = Engine(logger=False, default_root_dir=tmp_path, enable_progress_bar=False, accelerator="cpu", devices=1,
                    val_check_interval=0.5)
    engine.fit(model=again, train_dataloaders=train, val_dataloaders=dm.val_dataloader())
    assert again.detector.bank.n_seen == model.detector.bank.n_seen == len(train_files) * (IMAGE_SIZE // 8) ** 2
    assert len(again.detector.bank) == len(model.detector.bank) and int(again.model.n_seen) == again.detector.bank.n_seen


@pytest.mark.slow
def test_the_radius_sample_is_drawn_from_what_the_epoch_reads(fitted, tmp_path):
    """A loader over a Subset works (its collate_fn batches the sample); an epoch cut short is refused by name."""
    from anomalib.engine import Engine
    from torch.utils.data import DataLoader, Subset

    from ocbank.errors import ConfigError
    from ocbank.integrations.anomalib import OCBank

    model, dm, _, train_files = fitted
    subset = DataLoader(Subset(dm.train_data, list(range(len(train_files)))), batch_size=3,
                        collate_fn=dm.train_data.collate_fn)
    over_subset = OCBank(weights="none", image_size=IMAGE_SIZE, radius_images=RADIUS_IMAGES, visualizer=False)
    _engine(tmp_path / "subset").fit(model=over_subset, train_dataloaders=subset)
    assert over_subset.detector.bank.radius_ == pytest.approx(model.detector.bank.radius_, rel=1e-5)
    assert over_subset.detector.bank.n_seen == model.detector.bank.n_seen

    train = DataLoader(dm.train_data, batch_size=3, collate_fn=dm.train_data.collate_fn)
    cut = OCBank(weights="none", image_size=IMAGE_SIZE, radius_images=RADIUS_IMAGES, visualizer=False)
    engine = Engine(logger=False, default_root_dir=tmp_path / "cut", enable_progress_bar=False, accelerator="cpu",
                    devices=1, limit_train_batches=1)
    with pytest.raises(ConfigError, match=r"reads only part of it \(limit_train_batches=1"):
        engine.fit(model=cut, train_dataloaders=train)
    assert not cut.detector.is_fitted
