"""OCBank: the Lightning hooks that stream training batches into ocbank's fit and hand predictions
to anomalib."""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections import Counter
from dataclasses import replace
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.models.components import AnomalibModule, MemoryBankMixin
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from ...config import (
    PARAMETERS,
    BackboneConfig,
    BankConfig,
    DataConfig,
    ScoringConfig,
    config_from_parameters,
    parameters_of,
)
from ...errors import ConfigError, NotFittedError
from ...model.detector import Detector
from ...model.export import settings_from_config
from ...model.record import open_bank
from .pre_processing import OCBankPreProcessor
from .torch_model import OCBankModel

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "ocbank"  # the Lightning checkpoint entry with the bank's metadata (JSON text)


def _whole_epoch_dataset(loader: Any, limit_train_batches: float | int) -> Any:
    """The map-style dataset behind ``loader`` when one epoch reads every image of it once: the radius
    sample is drawn from the dataset by position, so it must be a sample of what the epoch trains on."""
    dataset = getattr(loader, "dataset", None)
    if not isinstance(loader, DataLoader) or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        msg = (
            f"radius='auto' draws its seeded sample of training images by position, got a training loader over "
            f"{type(dataset).__name__} that has no length or positions. Pass a map-style dataset or set radius to a number."
        )
        raise ConfigError(msg)
    sampler, n = loader.sampler, len(dataset)
    whole = isinstance(sampler, SequentialSampler) or (
        isinstance(sampler, RandomSampler) and not sampler.replacement and sampler.num_samples == n
    )
    if not whole:
        msg = (
            f"radius='auto' samples the whole training dataset, got a loader whose sampler is {type(sampler).__name__}, "
            "which may read only part of it. Use a plain or shuffled DataLoader, or set radius to a number."
        )
        raise ConfigError(msg)
    cut = (loader.drop_last and n % (loader.batch_size or 1)) or (
        limit_train_batches < 1.0 if isinstance(limit_train_batches, float) else limit_train_batches < len(loader)
    )
    if cut:
        msg = (
            f"radius='auto' samples the whole training dataset, got an epoch that reads only part of it "
            f"(limit_train_batches={limit_train_batches!r}, drop_last={loader.drop_last}). Train on every image or set radius to a number."
        )
        raise ConfigError(msg)
    return dataset


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
        loader = self.trainer.train_dataloader
        dataset = _whole_epoch_dataset(loader, self.trainer.limit_train_batches) if self.model.needs_radius_sample else None
        sample = self.model.begin(len(dataset) if dataset is not None else 0)
        if sample:
            self._feed_radius_sample(loader, dataset, sample)

    def _feed_radius_sample(self, loader: DataLoader, dataset: Any, positions: list[int]) -> None:
        """The radius sample's images, batched as the loader batches them, moved and pre-processed as
        Lightning moves and pre-processes training batches, into the fit."""
        step = loader.batch_size or len(positions)
        for lo in range(0, len(positions), step):
            batch = loader.collate_fn([dataset[i] for i in positions[lo : lo + step]])
            if not isinstance(batch, Batch):
                msg = (
                    f"radius='auto' needs anomalib batches that name their images (image_path), got a "
                    f"{type(batch).__name__} from the loader's collate_fn. Use an anomalib dataset's collate_fn or set radius to a number."
                )
                raise ConfigError(msg)
            paths = self._batch_paths(batch)  # before any work: a batch without names is refused here
            batch = self.on_before_batch_transfer(batch, 0)
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            batch = self.on_after_batch_transfer(batch, 0)
            if isinstance(self.pre_processor, PreProcessor):
                self.pre_processor.on_train_batch_start(self.trainer, self, batch, 0)
            self.model.add_images(batch.image)
            self._sample_paths.update(paths)

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
        """MemoryBankMixin's hook, at the end of an epoch: close the fit (and a radius sample still open) and publish the bank."""
        left = sum(self._sample_paths.values())
        if left:
            log.warning("%d radius-sample image(s) were fed first but not met again in the epoch's batches", left)
        self._sample_paths = Counter()
        self.model.finish()
        self._is_fitted = torch.tensor([True], device=self.device)

    def on_validation_start(self) -> None:
        # A validation inside the epoch, or at its end (Lightning validates before on_train_epoch_end):
        # score with what the epoch has fed so far; the fit itself closes at the epoch's end.
        if self.model.pending:
            self.model.publish_so_far()
            self._is_fitted = torch.tensor([self.model.fitted], device=self.device)

    def on_train_epoch_end(self) -> None:
        if self.model.fitting or self.model.pending:
            self.fit()

    def on_exception(self, exception: BaseException) -> None:
        del exception
        self.model.abandon()  # the radius sample's spool goes with the failed epoch
        self._sample_paths = Counter()

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
