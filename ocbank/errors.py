"""The exceptions ocbank raises on purpose: every one derives from :class:`OcbankError`.

Each also subclasses the matching builtin (``ValueError``, ``TypeError``, ...), so
code written against the builtins keeps working. The CLI turns an ``OcbankError``
into one line; anything else is a bug and surfaces with its traceback.
"""

from __future__ import annotations


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


class DependencyError(OcbankError, ImportError):
    """An optional dependency (faiss, Ray, onnx, ...) is missing; the message names the extra."""


class ServeError(OcbankError, RuntimeError):
    """``ocbank serve`` cannot serve: no bank of the folder could be loaded (each is named with why)."""
