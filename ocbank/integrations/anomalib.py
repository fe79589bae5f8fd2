"""ocbank as an anomalib model, used exactly like anomalib's ``Patchcore``::

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from ocbank.integrations.anomalib import OCBank
    Engine().fit(model=OCBank(radius="auto"), datamodule=MVTecAD(category="bottle"))

:class:`OCBank` is an anomalib ``AnomalibModule`` whose torch model (:class:`OCBankModel`)
is ocbank's own: the :class:`~ocbank.model.detector.Detector`'s WideResNet-50 and
:class:`~ocbank.engine.ClusterBank` for training, and :class:`~ocbank.model.module.AnomalyModel`
(image -> score, map; matrix products only) for prediction and export. Training batches
stream into the bank as they arrive, through the Detector's
:class:`~ocbank.model.builder.BankBuilder` (the build's own fitting code): with
``radius="auto"`` the seeded radius sample of the training dataset is read and fed first
(the epoch's batches then skip those images), every later batch goes straight into the
bank, and there is no end-of-epoch coreset, so memory stays flat in the number of training
images.

Prediction returns anomalib's batch (``pred_score`` = the raw 1-NN distance of the worst
patch, ``anomaly_map`` [N, 1, S, S] in the same units), so anomalib's post-processor,
thresholds, evaluator, visualizer and exporters work unchanged. The pre-processor is
ocbank's: the same resize and center crop as ``ocbank build`` / ``predict`` (PIL bilinear,
8-bit), so one image gets one score in both. Banks convert both ways:
:meth:`OCBank.from_bank` loads a bank file, :meth:`OCBank.to_bank` writes one that
``ocbank predict``, ``serve`` and ``update`` take.

Needs the ``anomalib`` extra (``pip install 'ocbank[anomalib]'``); ``import ocbank`` never imports this.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..config import (
    PARAMETERS,
    BackboneConfig,
    BankConfig,
    DataConfig,
    ScoringConfig,
    config_from_parameters,
    parameters_of,
)
from ..data import Transform
from ..data.images import rgb8_to_unit
from ..engine.checkpoint import BankState
from ..errors import ConfigError, DependencyError, NotFittedError
from ..model.builder import BankBuilder
from ..model.detector import Detector
from ..model.export import settings_from_config
from ..model.features import FEATURE_DIM
from ..model.module import AnomalyModel, MatmulNearest
from ..model.record import BankRecord, open_bank
from ..model.scoring import GridScore, MapSpec

try:
    from anomalib import LearningType
    from anomalib.data import Batch, InferenceBatch
    from anomalib.models.components import AnomalibModule, MemoryBankMixin
    from anomalib.post_processing import PostProcessor
    from anomalib.pre_processing import PreProcessor
except ImportError as exc:  # pragma: no cover - the extra is missing
    msg = f"ocbank.integrations.anomalib needs anomalib >= 2.7, got ImportError: {exc}. Run pip install 'ocbank[anomalib]'."
    raise DependencyError(msg) from exc

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "ocbank"  # the Lightning checkpoint entry with the bank's metadata (JSON text)
# Keys of that entry that hold the bank's own state (the rest is its record, as in a bank file).
_BANK_EXTRAS = ("spread_known", "radius_growth", "radius_history")


# ---------------------------------------------------------------------- pre-processing
@dataclass(frozen=True)
class ResizeCrop:
    """ocbank's geometry on anomalib batches: image by image with PIL, the pixels ``ocbank predict`` sees.

    Called as anomalib's pre-processor transform: ``(image [B, 3, H, W] float in [0, 1],
    gt_mask [B, H, W] or None) -> (image [B, 3, S, S], gt_mask [B, S, S])``, or with the
    image alone. Images are taken back to 8 bits (anomalib decodes 8-bit files to
    ``k / 255``, so this is exact), resized and cropped by :class:`ocbank.data.Transform`
    (bilinear), and scaled to [0, 1]; masks go through the same transform (nearest).
    """

    resize: int
    crop: int | None

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        geometry = Transform(self.resize, self.crop)
        u8 = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        rgb = np.stack([geometry.rgb(Image.fromarray(im)) for im in u8])
        out = rgb8_to_unit(rgb).contiguous().to(images.device)
        return _like(out, images)

    def _masks(self, masks: torch.Tensor) -> torch.Tensor:
        geometry = Transform(self.resize, self.crop)
        arr = masks.detach().cpu().numpy()
        flat = arr.reshape(-1, *arr.shape[-2:])
        out = np.stack([geometry.mask(m > 0, (m.shape[1], m.shape[0]), "gt_mask") for m in flat])
        out = torch.from_numpy(out.reshape(*arr.shape[:-2], *out.shape[-2:])).to(masks.device, masks.dtype)
        return _like(out, masks)

    def __call__(self, image: torch.Tensor, *gt_mask: torch.Tensor | None) -> Any:
        """``(image)`` -> image; ``(image, gt_mask)`` -> (image, gt_mask), as anomalib's pre-processor calls it."""
        single = image.ndim == 3
        out = self._images(image[None] if single else image)
        out = out[0] if single else out
        if not gt_mask:
            return out
        mask = gt_mask[0]
        return out, (None if mask is None else self._masks(mask))


def _like(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Keep torchvision's tensor subclass (tv_tensors.Image / Mask) of ``ref``."""
    from torchvision import tv_tensors  # noqa: PLC0415

    return tv_tensors.wrap(out, like=ref) if isinstance(ref, tv_tensors.TVTensor) else out


def resize_weights(n: int | torch.SymInt, size: int, like: torch.Tensor) -> torch.Tensor:
    """[n, size] weights of PIL's bilinear resize of a line of n pixels to ``size`` (output j = sum_i x_i w_ij).

    PIL's triangle filter, stretched by the scale when shrinking (its antialiasing), each
    column normalised to sum 1; built from ``arange`` so that n may be a symbolic size.
    """
    i = torch.arange(n, device=like.device, dtype=like.dtype)
    scale = torch.ones((), device=like.device, dtype=like.dtype) * n / size
    support = torch.clamp(scale, min=1.0)
    center = (torch.arange(size, device=like.device, dtype=like.dtype) + 0.5) * scale
    w = torch.clamp(1.0 - torch.abs((i[:, None] + 0.5 - center[None, :]) / support), min=0.0)
    return w / w.sum(0, keepdim=True)


def _to_level(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5).clamp(0, 255)  # PIL rounds half up, to 8 bits


class ExportResizeCrop(nn.Module):
    """The traceable form of :class:`ResizeCrop` for exported graphs: [B, 3, H, W] in [0, 1] -> [B, 3, S, S].

    PIL's resize written as two matrix products (:func:`resize_weights`; rows first, 8-bit
    rounding after each pass, as PIL does), then the same crop. It exports with dynamic
    H and W as MatMul nodes that onnxruntime and OpenVINO compute alike (OpenVINO's own
    antialiased Resize does not match PIL), and stays within one 8-bit level of PIL on
    every pixel (equal on most: the rest are PIL's fixed-point ties).
    """

    def __init__(self, resize: int, crop: int | None) -> None:
        super().__init__()
        self.resize = resize
        self.crop = crop or resize

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = _to_level(image.clamp(0, 1) * 255)
        x = _to_level(torch.matmul(x, resize_weights(x.shape[-1], self.resize, x)))
        x = _to_level(torch.matmul(resize_weights(x.shape[-2], self.resize, x).T, x))
        off = (self.resize - self.crop) // 2
        return x[..., off : off + self.crop, off : off + self.crop] / 255.0


class OCBankPreProcessor(PreProcessor):
    """anomalib's PreProcessor with ocbank's resize and crop (no Normalize: the model normalises).

    Training, validation, test and predict batches go through :class:`ResizeCrop` (PIL,
    as ocbank); the exported graph through :class:`ExportResizeCrop`. The geometry comes
    from the model's own settings, so checkpoints store none of it.
    """

    def __init__(self, resize: int, crop: int | None) -> None:
        super().__init__(transform=None)
        self.transform = ResizeCrop(resize, crop)
        self.export_transform = ExportResizeCrop(resize, crop)

    def checkpoint_config(self) -> dict[str, Any]:
        return {"transform": None}  # rebuilt from OCBank's hyper-parameters

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        del config  # the geometry is the model's, not the checkpoint's


# ---------------------------------------------------------------------- torch model
class OCBankModel(nn.Module):
    """anomalib's torch model for :class:`OCBank`: RGB [N, 3, S, S] in [0, 1] -> InferenceBatch.

    ``scorer`` is ocbank's :class:`AnomalyModel` (backbone layers shared with the
    detector's extractor; the bank's means as buffers); ``detector.bank_`` is the live
    :class:`ClusterBank` that training streams into. The buffers ``counts`` [K],
    ``m2`` [K], ``radius`` and ``n_seen`` (with the scorer's means) are the bank in the
    state dict, so a Lightning checkpoint restores it into a fresh model.
    """

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector
        config = detector.config
        self.spec = MapSpec.from_config(config)
        # An unfitted scorer holds one placeholder centroid; forward refuses it (counts is empty).
        self.scorer = self._scorer(np.zeros((1, FEATURE_DIM), np.float32))
        self.register_buffer("counts", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("m2", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("radius", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("n_seen", torch.tensor(0, dtype=torch.int64))
        self._builder: BankBuilder | None = None  # this epoch's fitting (Detector.builder)
        self.pending = False  # images streamed since the last publish
        self.checkpoint_extras: dict[str, Any] = {}  # set by OCBank.on_load_checkpoint
        self.register_load_state_dict_post_hook(OCBankModel._after_load)

    def _scorer(self, means: np.ndarray) -> AnomalyModel:
        """The exportable AnomalyModel over ``means`` [K, 1536] (GEMM search) with the config's scoring."""
        det = self.detector
        return AnomalyModel(det.extractor, MatmulNearest(means), self.spec, score=GridScore.from_config(det.config))

    def train(self, mode: bool = True) -> OCBankModel:
        """Lightning's train mode: the flag only. The backbone stays in eval (frozen batch norm), as ocbank's."""
        super().train(mode)
        self.scorer.eval()
        return self

    @property
    def fitted(self) -> bool:
        return self.counts.numel() > 0

    # ------------------------------------------------------------------ training
    @property
    def needs_radius_sample(self) -> bool:
        """Whether the next epoch starts a bank whose radius comes from the seeded radius sample."""
        return not self.detector.is_fitted and self.detector.config.bank.radius == "auto"

    def begin(self, n_images: int) -> list[int]:
        """Start an epoch of ``n_images`` training images: a new bank, or, when there is one, stream
        on into it (ocbank's update). Returns the radius sample's positions among them, which are
        to be fed first (:meth:`add_images`); none with a numeric radius or a fitted bank."""
        self._builder = self.detector.builder(n_images)
        return self._builder.sample

    @torch.no_grad()
    def add_images(self, images: torch.Tensor) -> None:
        """One training batch [B, 3, S, S] (RGB in [0, 1], pre-processed) into the fit (:meth:`begin` first)."""
        if self._builder is None:
            msg = "OCBankModel.add_images() came before begin(n_images). Train through anomalib's Engine.fit."
            raise NotFittedError(msg)
        self.pending = True
        self._builder.feed(self.scorer.patch_features(images))  # [B, h, w, 1536]

    def finish(self) -> None:
        """End of an epoch: the radius rule on a sample still open (fewer images came than it was
        sized for), the bank to the detector, then publish."""
        builder, self._builder = self._builder, None
        if builder is not None:
            with builder:
                self.detector.use_fitted(builder.finish())  # DataError when no image came
        self.publish()

    def publish(self) -> None:
        """Copy the live bank into the scorer and the buffers (what prediction, export and checkpoints use)."""
        self.pending = False
        state = self.detector.bank.state()
        device = self.counts.device
        self.scorer = self._scorer(state.means).to(device)
        self.counts = torch.from_numpy(np.asarray(state.counts, np.int64)).to(device)
        self.m2 = torch.from_numpy(np.asarray(state.m2, np.float64)).to(device)
        self.radius = torch.tensor(state.radius, dtype=torch.float64, device=device)
        self.n_seen = torch.tensor(state.n_seen, dtype=torch.int64, device=device)

    # ------------------------------------------------------------------ pickling (anomalib's torch export)
    def __getstate__(self) -> dict[str, Any]:
        # The live Detector holds locks and a faiss-backed bank: pickle what rebuilds them instead.
        state = dict(super().__getstate__())
        det = state.pop("detector")
        state["_builder"] = None
        state["_detector"] = {
            "config": det.config,
            "extractor": det.extractor,
            "extras": self.extras() if self.fitted else {},
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        saved = state.pop("_detector")
        super().__setstate__(state)
        self.detector = Detector.from_config(saved["config"], extractor=saved["extractor"])
        self.checkpoint_extras = saved["extras"]
        if self.fitted:
            self.restore_bank()

    # ------------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The bank's size is data: take the incoming shapes before the default copy.
        search = self.scorer.nearest
        for owner, name in ((self, "counts"), (self, "m2"), (search, "means_t"), (search, "means_sq")):
            # the search's buffers, or where checkpoints written before it was a submodule hold them
            keys = [prefix + name] if owner is self else [prefix + f"scorer.nearest.{name}", prefix + f"scorer.{name}"]
            key = next((k for k in keys if k in state_dict), None)
            if key is not None:
                setattr(owner, name, torch.empty_like(state_dict[key], device=self.counts.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _after_load(module: OCBankModel, incompatible: Any) -> None:
        del incompatible
        if module.fitted:
            module.restore_bank()

    def restore_bank(self) -> None:
        """Rebuild the detector's ClusterBank (and metadata) from the buffers and checkpoint extras."""
        det = self.detector
        extras = dict(self.checkpoint_extras)
        bank = {key: extras.pop(key) for key in _BANK_EXTRAS if key in extras}
        # The rest is the bank file's record; a malformed config or decision: ConfigError, as on load.
        record = BankRecord.from_metadata({"config": det.config.to_dict(), **extras}, "<anomalib checkpoint>")
        state = BankState(
            means=self.scorer.nearest.means_t.T.contiguous().cpu().numpy(),
            counts=self.counts.cpu().numpy(),
            radius=float(self.radius),
            dim=FEATURE_DIM,
            n_seen=int(self.n_seen),
            m2=self.m2.cpu().numpy(),
            spread_known=bool(bank.get("spread_known", True)),
            max_centroids=record.config.bank.max_centroids,
            radius_growth=float(bank.get("radius_growth", 1.25)),
            radius_history=list(bank.get("radius_history", [])),
        )
        det.restore(state, record)

    def extras(self) -> dict[str, Any]:
        """What the state dict does not hold: the full config, radius rule, cap history, thresholds, lineage."""
        det = self.detector
        bank = det.bank
        return {
            **det.record().to_metadata(),
            "spread_known": bank.spread_known_,
            "radius_growth": bank.radius_growth,
            "radius_history": bank.radius_history_,
        }

    # ------------------------------------------------------------------ prediction
    def forward(self, images: torch.Tensor) -> InferenceBatch:
        if not self.fitted:
            msg = "this OCBank has no bank yet: fit it (Engine.fit), load a checkpoint, or use OCBank.from_bank(path)."
            raise NotFittedError(msg)
        score, amap = self.scorer(images)[:2]
        return InferenceBatch(pred_score=score, anomaly_map=amap[:, None])


# ---------------------------------------------------------------------- lightning module
class OCBank(MemoryBankMixin, AnomalibModule):
    """ocbank's online cluster memory bank as an anomalib model (a drop-in for ``Patchcore``).

    Parameters are :class:`~ocbank.model.detector.Detector`'s, with its defaults:

    radius : "auto" (p99 of nearest-other-patch distances of a seeded sample of ``radius_images``
        training images) or a number.
    weights : "imagenet" (torchvision's file, never downloaded: see ``ocbank build``), "none"
        (random, seeded: tests and demos only) or a ``.pth`` state dict.
    pool : "none" (the method) or "avg3" (PatchCore's 3x3 averaging).
    sigma : Gaussian blur of the maps in pixels.
    max_centroids : hard cap on the bank (the radius grows to keep it), or None.
    scoring_mode : image score from the distance grid: "nn" (its maximum), "local_mean", "local_gauss".
    image_size, resize : center crop side S and the square resize before it (None: S * 256 / 224).
    radius_images, seed : the radius sample's size and the radius rule's seed.
    pre_processor, post_processor, evaluator, visualizer : anomalib's components; the default
        pre-processor is ocbank's resize and crop (:class:`OCBankPreProcessor`).
    """

    def __init__(
        self,
        radius: float | str = BankConfig.radius,
        weights: str = BackboneConfig.weights,
        pool: str = BackboneConfig.pool,
        sigma: float = ScoringConfig.sigma,
        max_centroids: int | None = BankConfig.max_centroids,
        scoring_mode: str = ScoringConfig.mode,
        image_size: int = DataConfig.crop,
        resize: int | None = None,
        radius_images: int = BankConfig.radius_images,
        seed: int = BankConfig.seed,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Any = True,
        visualizer: Any = True,
    ) -> None:
        # The hyper-parameters are Config fields (config.PARAMETERS): read them once, by name.
        params = {name: value for name, value in locals().items() if name in PARAMETERS}
        detector = Detector.from_config(config_from_parameters(**params))
        if pre_processor is True:
            pre_processor = OCBankPreProcessor(detector.config.data.resize, detector.config.data.crop)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model: OCBankModel = OCBankModel(detector)
        self._sample_paths: Counter[str] = Counter()  # radius-sample images fed first, still to be met in the epoch

    @classmethod
    def configure_pre_processor(
        cls, image_size: tuple[int, int] | int | None = None, resize: int | None = None
    ) -> OCBankPreProcessor:
        """ocbank's resize and center crop for a crop side ``image_size`` (default 224, after a 256 resize)."""
        if isinstance(image_size, (tuple, list)):
            if image_size[0] != image_size[1]:
                msg = f"ocbank crops square images, got image_size {tuple(image_size)!r}. Pass one side, e.g. 224."
                raise ConfigError(msg)
            image_size = image_size[0]
        data = config_from_parameters(image_size=image_size or DataConfig.crop, resize=resize).data
        return OCBankPreProcessor(data.resize, data.crop)

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        return PostProcessor()

    @staticmethod
    def configure_optimizers() -> None:
        return None  # nothing is trained by gradient descent

    @property
    def detector(self) -> Detector:
        """The ocbank Detector behind this model (its config, extractor and bank)."""
        return self.model.detector

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        # One pass: each epoch streams its images into the bank, so a second one would count them twice.
        return {"gradient_clip_val": 0, "max_epochs": 1, "num_sanity_val_steps": 0, "devices": 1}

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS

    # ------------------------------------------------------------------ lightning hooks
    def on_fit_start(self) -> None:
        """Every ``fit`` streams its images, on a new Engine or on one that has fitted before.

        A fit is one epoch (``max_epochs=1``), and Lightning skips a later ``fit`` of the same
        trainer as done; its loop is given one more epoch, so those images enter the bank.
        """
        super().on_fit_start()
        loop = self.trainer.fit_loop
        done = loop.epoch_progress.current.processed
        if loop.max_epochs is not None and 0 <= loop.max_epochs <= done:
            loop.max_epochs = done + 1

    def on_train_epoch_start(self) -> None:
        """A new bank starts with the seeded radius sample (ocbank's rule, :func:`~ocbank.model.builder.radius_sample`):
        those images are read from the training dataset and fed first, and the epoch's batches then skip them."""
        self._sample_paths = Counter()
        dataset = self._training_dataset() if self.model.needs_radius_sample else None
        sample = self.model.begin(len(dataset) if dataset is not None else 0)
        if sample:
            self._feed_radius_sample(dataset, sample)

    def _training_dataset(self) -> Any:
        """The map-style dataset the training batches come from (the radius sample is drawn from it by position)."""
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is None and getattr(self.trainer, "datamodule", None) is not None:
            dataset = getattr(self.trainer.datamodule, "train_data", None)
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            msg = (
                f"radius='auto' draws its seeded sample of training images by position, got a training loader over "
                f"{type(dataset).__name__} that has no length or positions. Pass a map-style dataset or set radius to a number."
            )
            raise ConfigError(msg)
        return dataset

    def _feed_radius_sample(self, dataset: Any, positions: list[int]) -> None:
        """The radius sample's images, collated and pre-processed as training batches are, into the fit."""
        step = getattr(self.trainer.train_dataloader, "batch_size", None) or len(positions)
        collate = getattr(dataset, "collate_fn", None)
        for lo in range(0, len(positions), step):
            items = [dataset[i] for i in positions[lo : lo + step]]
            batch = collate(items) if collate is not None else items
            if not isinstance(batch, Batch) or batch.image_path is None:
                msg = (
                    f"radius='auto' needs anomalib batches that name their images (image_path), got {type(batch).__name__}. "
                    "Use an anomalib dataset or set radius to a number."
                )
                raise ConfigError(msg)
            if isinstance(self.pre_processor, PreProcessor):
                self.pre_processor.on_train_batch_start(self.trainer, self, batch, 0)
            self.model.add_images(batch.image.to(self.device))
            self._sample_paths.update(str(p) for p in batch.image_path)

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> torch.Tensor:
        del args, kwargs
        images = batch.image
        if self._sample_paths:  # the radius sample was fed first: each of its images enters once
            keep = [not self._take_sample_path(p) for p in self._batch_paths(batch)]
            images = images[torch.tensor(keep, device=images.device)]
        if images.shape[0]:
            self.model.add_images(images)
        return torch.tensor(0.0, requires_grad=True, device=self.device)  # Lightning wants a loss

    @staticmethod
    def _batch_paths(batch: Batch) -> list[str]:
        if batch.image_path is None:
            msg = "radius='auto' needs training batches that name their images (image_path), got none. Set radius to a number."
            raise ConfigError(msg)
        return [str(p) for p in batch.image_path]

    def _take_sample_path(self, path: str) -> bool:
        if self._sample_paths[path] > 0:
            self._sample_paths[path] -= 1
            return True
        return False

    def fit(self) -> None:
        """MemoryBankMixin's hook: close the radius sample if still open and publish the bank."""
        left = sum(self._sample_paths.values())
        if left:
            log.warning("%d radius-sample image(s) were fed first but not met again in the epoch's batches", left)
        self._sample_paths = Counter()
        self.model.finish()
        self._is_fitted = torch.tensor([True], device=self.device)

    def on_validation_start(self) -> None:
        # Lightning validates before on_train_epoch_end: publish what this epoch streamed first,
        # also when it updated an already fitted bank (MemoryBankMixin would only fit once).
        if self.model.pending:
            self.fit()

    def on_train_epoch_end(self) -> None:
        if self.model.pending:
            self.fit()

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Any:
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.model.fitted:
            checkpoint[CHECKPOINT_KEY] = json.dumps(self.model.extras(), sort_keys=True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        text = checkpoint.get(CHECKPOINT_KEY)
        self.model.checkpoint_extras = json.loads(text) if text else {}

    # ------------------------------------------------------------------ export
    def to_onnx(self, *args: Any, **kwargs: Any) -> Any:
        settings_from_config(self.detector.config)  # refuses the scoring modes the graph does not compute
        return super().to_onnx(*args, **kwargs)

    # ------------------------------------------------------------------ bank files
    @classmethod
    def from_bank(cls, path: str | os.PathLike[str], **components: Any) -> OCBank:
        """An OCBank holding the bank of an ``ocbank build`` file (config, radius, thresholds included).

        ``components``: anomalib's ``pre_processor``, ``post_processor``, ``evaluator``, ``visualizer``.
        The post-processor's normalisation and thresholds still come from a validation run
        (``Engine.validate``) as for any anomalib model; the bank's own calibrated thresholds
        travel on to :meth:`to_bank`.
        """
        opened = open_bank(path)  # validates the file and the weights' sha256
        hyperparameters = [name for name in inspect.signature(cls.__init__).parameters if name in PARAMETERS]
        model = cls(**parameters_of(opened.record.config, hyperparameters), **components)
        model.detector.restore(opened.state, opened.record)
        model.model.publish()
        model._is_fitted = torch.tensor([True], device=model.device)
        return model

    def to_bank(self, path: str | os.PathLike[str]) -> None:
        """Write the bank as an ocbank bank file (atomic; Detector.save's metadata) for predict, serve, update."""
        if not self.model.fitted:
            msg = f"this OCBank has no bank to write to {os.fspath(path)!r}. Fit it or load a checkpoint first."
            raise NotFittedError(msg)
        self.detector.save(path, build=replace(self.detector.record().build, complete=True))


__all__ = ["ExportResizeCrop", "OCBank", "OCBankModel", "OCBankPreProcessor", "ResizeCrop"]
