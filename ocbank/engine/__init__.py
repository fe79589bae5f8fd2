"""The engine: the cluster bank, its stores and kernel, and its file format.

The engine knows nothing of images, models or jobs; its only I/O is the bank file.
"""

from .bank import MAX_K, ClusterBank
from .checkpoint import BankState
from .device import cuda_available, resolve_device
from .store import Store

__all__ = ["MAX_K", "BankState", "ClusterBank", "Store", "cuda_available", "resolve_device"]
