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

from ...errors import DependencyError

try:
    from anomalib import LearningType  # noqa: F401  (the names this package uses, checked once here)
    from anomalib.data import Batch, InferenceBatch  # noqa: F401
    from anomalib.models.components import AnomalibModule, MemoryBankMixin  # noqa: F401
    from anomalib.post_processing import PostProcessor  # noqa: F401
    from anomalib.pre_processing import PreProcessor  # noqa: F401
except ImportError as exc:  # pragma: no cover - the extra is missing
    msg = f"ocbank.integrations.anomalib needs anomalib >= 2.7, got ImportError: {exc}. Run pip install 'ocbank[anomalib]'."
    raise DependencyError(msg) from exc

from .lightning_model import CHECKPOINT_KEY, OCBank  # noqa: E402
from .pre_processing import ExportResizeCrop, OCBankPreProcessor, ResizeCrop  # noqa: E402
from .torch_model import OCBankModel  # noqa: E402

__all__ = ["CHECKPOINT_KEY", "ExportResizeCrop", "OCBank", "OCBankModel", "OCBankPreProcessor", "ResizeCrop"]
