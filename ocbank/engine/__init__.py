"""The engine: the cluster bank, its stores and kernel, and its file format.

The engine knows nothing of images, models or jobs; its only I/O is the bank file.
"""

from .bank import MAX_K, ClusterBank, cuda_available, resolve_device
from .checkpoint import BankState
from .store import Store

__all__ = ["MAX_K", "BankState", "ClusterBank", "Store", "cuda_available", "resolve_device"]
