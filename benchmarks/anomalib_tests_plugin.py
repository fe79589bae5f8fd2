"""A pytest plugin that adds OCBank to anomalib's own model integration tests (their code is not vendored).

anomalib's ``tests/integration/model/test_models.py`` takes its model list from
``anomalib.models.list_models()`` and builds each with ``get_model(name)``. This plugin,
loaded before their test module is imported, makes the list ``{"ocbank"}`` (add
``ANOMALIB_TESTS_ALSO=patchcore,...`` to run anomalib's own models beside it) and builds
``"ocbank"`` as ``OCBank(weights="none")``: a seeded random backbone, since no weights can
be downloaded. See benchmarks/anomalib_model_tests.sh for the whole procedure.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import anomalib.models as _models  # noqa: E402

_get_model = _models.get_model


def list_models(*args: Any, **kwargs: Any) -> set[str]:
    del args, kwargs
    also = {name for name in os.environ.get("ANOMALIB_TESTS_ALSO", "").split(",") if name}
    return {"ocbank", *also}


def get_model(model: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(model, str) and model.lower() == "ocbank":
        from ocbank.integrations.anomalib import OCBank

        return OCBank(weights="none", **kwargs)
    return _get_model(model, *args, **kwargs)


_models.list_models = list_models
_models.get_model = get_model


def pytest_configure(config: Any) -> None:
    """Their session fixture writes a dummy dataset for every format; the model tests read only MVTec AD.

    The Kaputt generator needs a parquet engine (pyarrow), which ocbank does not install: skip that one.
    """
    del config
    try:
        from tests.helpers.data import DummyImageDatasetGenerator
    except ImportError:  # not run from anomalib's test tree
        return
    DummyImageDatasetGenerator._generate_dummy_kaputt_dataset = lambda self: None
