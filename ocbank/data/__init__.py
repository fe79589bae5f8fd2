"""Data: image reading, dataset layouts and the ordered loader."""

from ..errors import DataError
from .datasets import (
    NAME_MAX,
    ClassSplit,
    Sample,
    calibration_images,
    class_names,
    escape_path,
    fit_name,
    ignored_name,
    images_in,
    list_inputs,
    load_split,
    unescape_path,
)
from .images import (
    IMAGE_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_IMAGE_PIXELS,
    Transform,
    normalize,
    open_image,
    open_mask,
)
from .loader import Batch, ImageDataset, make_loader

__all__ = [
    "Batch",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "NAME_MAX",
    "ClassSplit",
    "DataError",
    "ImageDataset",
    "Sample",
    "Transform",
    "calibration_images",
    "class_names",
    "escape_path",
    "fit_name",
    "ignored_name",
    "images_in",
    "list_inputs",
    "load_split",
    "make_loader",
    "normalize",
    "open_image",
    "open_mask",
    "unescape_path",
]
