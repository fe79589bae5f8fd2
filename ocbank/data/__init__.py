"""Data: image reading, dataset layouts and the ordered loader."""

from ..errors import DataError
from .datasets import ClassSplit, Sample, class_names, load_split
from .images import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, Transform, open_image
from .loader import ImageDataset, make_loader

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "ClassSplit",
    "DataError",
    "ImageDataset",
    "Sample",
    "Transform",
    "class_names",
    "load_split",
    "make_loader",
    "open_image",
]
