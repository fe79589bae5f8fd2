"""The engine: the cluster bank, its stores and kernel, and its file format.

The engine knows nothing of images, models or jobs; its only I/O is the bank file.
"""

from .bank import ClusterBank, cuda_available, resolve_device
from .checkpoint import BankState

__all__ = ["BankState", "ClusterBank", "cuda_available", "resolve_device"]
