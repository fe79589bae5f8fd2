"""The exceptions ocbank raises on purpose: every one derives from :class:`OcbankError`.

Each also subclasses the matching builtin (``ValueError``, ``TypeError``, ...), so
code written against the builtins keeps working. The CLI turns an ``OcbankError``
into one line; anything else is a bug and surfaces with its traceback.
"""

from __future__ import annotations

import logging

_SAID: set[str] = set()


def warn_once(logger: logging.Logger, message: str) -> None:
    """Log ``message`` as a warning the first time this process sees it.

    For notes about a whole run (random weights, autocast off on the CPU) that each of the
    run's steps would otherwise repeat: a build and the evaluation after it load a backbone each.
    """
    if message not in _SAID:
        _SAID.add(message)
        logger.warning("%s", message)


class OcbankError(Exception):
    """Base of every error ocbank raises deliberately; the message names the value and the fix."""


class ConfigError(OcbankError, ValueError):
    """A configuration value that cannot be used."""


class InputError(OcbankError, ValueError):
    """An argument or array that cannot be used (wrong shape, NaN rows, bad k, ...)."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong type or dtype."""


class DataError(OcbankError, ValueError):
    """A dataset, image list or image that cannot be used."""


class NotAnImageError(DataError):
    """Bytes or a file that no image decoder recognises (text, an archive, ...)."""


class ImageTooLargeError(DataError):
    """An image whose header declares more pixels than ``ocbank.data.images.MAX_IMAGE_PIXELS``."""


class CheckpointError(OcbankError, ValueError):
    """A bank file that cannot be used; the message names the file and the problem."""


class WeightsError(OcbankError, FileNotFoundError):
    """Backbone weights that cannot be found or loaded; the message says how to supply them."""


class DeviceError(OcbankError, RuntimeError):
    """A requested device (CUDA) that is not available."""


class NotFittedError(OcbankError, RuntimeError):
    """A model or bank used before it was fitted or loaded."""


class BuildLockError(OcbankError, RuntimeError):
    """Another build or update holds the output directory."""


class BankChangedError(OcbankError, RuntimeError):
    """A bank file changed under an update that read it (another writer); nothing was written."""


class UpdateRefusedError(OcbankError, ValueError):
    """An update refused as a whole before anything was written (the growth guard, or no threshold to gate on)."""


class VersionNotFoundError(OcbankError, LookupError):
    """No kept bank version, or more than one, matches the sha256 prefix asked for."""


class DependencyError(OcbankError, ImportError):
    """An optional dependency (faiss, Ray, onnx, ...) is missing; the message names the extra."""


class ServeError(OcbankError, RuntimeError):
    """``ocbank serve`` cannot serve: no bank of the folder could be loaded (each is named with why)."""


class PortInUseError(OcbankError, OSError):
    """A server's port that something else already listens on, or that cannot be listened on."""
