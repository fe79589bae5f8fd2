"""ClusterBank: the online cluster memory bank (the method's Algorithm 1)."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from . import checkpoint
from ._faiss import faiss_has_gpu
from .store import CpuStore, TorchStore

_DEVICES = ("cpu", "cuda", "auto")


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "is_floating_point")


def cuda_available() -> bool:
    """True when both torch and faiss see a CUDA GPU."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return False
    return bool(torch.cuda.is_available()) and faiss_has_gpu()


def resolve_device(device: str) -> str:
    """Map ``"cpu" | "cuda" | "cuda:N" | "auto"`` to a concrete device string."""
    if device == "cpu":
        return "cpu"
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if not cuda_available():
        msg = (
            f"device={device!r} was requested, but no CUDA GPU is visible to both torch and "
            "faiss. Use device='cpu' (or 'auto'), or install the GPU build: pip install '.[gpu]'."
        )
        raise ValueError(msg)
    return device


class ClusterBank:
    """Streaming nearest-centroid memory bank with radius ``radius``.

    For each arriving vector x (in arrival order) the nearest centroid mu_k is
    found (ties: lowest index). If ``||x - mu_k|| <= radius`` it absorbs x with
    a Welford update ``n_k += 1; mu_k += (x - mu_k) / n_k``; otherwise x becomes a
    new centroid with count 1. Batches are searched at once with FAISS and the
    dependencies inside a batch are resolved exactly, so ``add`` gives the same
    bank as adding rows one at a time, whatever the batch split.

    Parameters
    ----------
    dim : int
        Feature dimension (1536 for WideResNet-50 layer2+layer3).
    radius : float
        Absorption radius r, in plain (not squared) L2 units.
    device : {"cpu", "cuda", "auto"}
        Where means and counts live and where searches run.
    """

    def __init__(self, dim: int, radius: float, device: str = "cpu") -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            msg = f"dim must be a positive integer, got {dim!r}. Pass the feature size, e.g. dim=1536."
            raise ValueError(msg)
        if isinstance(radius, bool) or not isinstance(radius, (int, float, np.floating, np.integer)):
            msg = f"radius must be a positive number, got {radius!r}. Pass e.g. radius=26.0."
            raise ValueError(msg)
        if not math.isfinite(float(radius)) or float(radius) <= 0:
            msg = f"radius must be finite and > 0, got {radius!r}. Pass e.g. radius=26.0."
            raise ValueError(msg)
        if not isinstance(device, str) or not (device in _DEVICES or device.startswith("cuda:")):
            msg = f"device must be one of 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}."
            raise ValueError(msg)
        self.dim = int(dim)
        self.radius = float(radius)
        self.device = device

    # ------------------------------------------------------------------ state
    @property
    def _bank_store(self) -> CpuStore | TorchStore:
        store = self.__dict__.get("store_")
        if store is None:
            device = resolve_device(self.device)
            if device == "cpu":
                store = CpuStore(self.dim, self.radius)
            else:
                store = TorchStore(self.dim, self.radius, device)
            self.store_ = store
            self.n_seen_ = 0
        return store

    @property
    def device_(self) -> str:
        """The concrete device in use ("cpu" or "cuda[:N]")."""
        store = self._bank_store
        return "cpu" if isinstance(store, CpuStore) else str(store.device)

    def __len__(self) -> int:
        store = self.__dict__.get("store_")
        return 0 if store is None else store.size

    def __repr__(self) -> str:
        return (
            f"ClusterBank(dim={self.dim}, radius={self.radius}, device={self.device!r}) "
            f"with {len(self)} centroids from {self.n_seen} vectors"
        )

    @property
    def means(self) -> np.ndarray:
        """Centroids, float32 [K, dim] (read-only view on CPU, a copy from GPU)."""
        if "store_" not in self.__dict__:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._bank_store.means

    @property
    def counts(self) -> np.ndarray:
        """Vectors absorbed per centroid, int64 [K]."""
        if "store_" not in self.__dict__:
            return np.zeros(0, dtype=np.int64)
        return self._bank_store.counts

    @property
    def n_seen(self) -> int:
        """Vectors consumed so far (the sum of counts)."""
        return int(self.__dict__.get("n_seen_", 0))

    @property
    def nbytes(self) -> int:
        """Bytes held by means and counts (K * (4 * dim + 8))."""
        return len(self) * (4 * self.dim + 8)

    # ------------------------------------------------------------------ input
    def _check_rows(self, x: Any, name: str = "x") -> Any:
        """Validate [n, dim] numeric input; return it as float32 for the store."""
        store = self._bank_store
        if _is_torch_tensor(x):
            import torch  # noqa: PLC0415

            if x.dtype == torch.bool or x.is_complex():
                msg = f"{name} must be a real numeric tensor, got dtype {x.dtype}. Convert with x.float()."
                raise TypeError(msg)
            shape = tuple(x.shape)
        else:
            if not isinstance(x, np.ndarray):
                x = np.asarray(x)
            if x.dtype.kind not in "fiu":
                msg = (
                    f"{name} must be a real numeric array, got dtype {x.dtype}. "
                    "Convert with x.astype(np.float32)."
                )
                raise TypeError(msg)
            shape = x.shape
        if len(shape) != 2 or shape[1] != self.dim:
            msg = f"{name} must have shape [n, {self.dim}], got {shape}. Reshape to (-1, {self.dim})."
            raise ValueError(msg)
        if isinstance(store, CpuStore):
            if _is_torch_tensor(x):
                x = x.detach().to("cpu").numpy()
            rows = np.ascontiguousarray(x, dtype=np.float32)
            finite = np.isfinite(rows).all(axis=1)
            bad = np.flatnonzero(~finite)
        else:
            import torch  # noqa: PLC0415

            if not _is_torch_tensor(x):
                x = torch.from_numpy(np.ascontiguousarray(x))
            rows = x.detach().to(device=store.device, dtype=torch.float32).contiguous()
            bad = torch.nonzero(~torch.isfinite(rows).all(dim=1)).flatten().cpu().numpy()
        if bad.size:
            msg = (
                f"{name} has {bad.size} row(s) with NaN or inf values (first at row {bad[0]}). "
                "Drop or repair those rows before adding; the bank was not changed."
            )
            raise ValueError(msg)
        return rows

    # ------------------------------------------------------------------ build
    def add(self, x: Any) -> ClusterBank:
        """Stream rows of ``x`` [n, dim] (numpy or torch, float32/float64) into the bank.

        A rejected call leaves the bank unchanged. An empty batch is a no-op.
        """
        rows = self._check_rows(x)
        n = rows.shape[0]
        if n:
            self._bank_store.add(rows, np.ones(n, dtype=np.int64))
            self.n_seen_ += n
        return self

    def partial_fit(self, X: Any, y: None = None) -> ClusterBank:
        """scikit-learn alias of :meth:`add`."""
        return self.add(X)

    def fit(self, X: Any, y: None = None) -> ClusterBank:
        """Reset the bank, then stream ``X`` [n, dim] into it."""
        self.__dict__.pop("store_", None)
        self.__dict__.pop("n_seen_", None)
        return self.add(X)

    def merge(self, other: ClusterBank) -> ClusterBank:
        """Fold ``other``'s centroids into this bank, in ``other``'s index order.

        Each centroid of ``other`` is streamed as a point of weight w = its count:
        absorbed by the nearest centroid within r (``mu += w (mu_b - mu) / (n + w)``)
        or appended with count w.
        """
        if not isinstance(other, ClusterBank):
            msg = f"merge expects a ClusterBank, got {type(other).__name__}."
            raise TypeError(msg)
        if other.dim != self.dim:
            msg = f"cannot merge a bank of dim {other.dim} into one of dim {self.dim}. Build both with the same features."
            raise ValueError(msg)
        if other.radius != self.radius:
            msg = (
                f"cannot merge a bank of radius {other.radius} into one of radius {self.radius}. "
                "Build both with the same radius."
            )
            raise ValueError(msg)
        if len(other) == 0:
            return self
        rows = self._check_rows(np.array(other.means, dtype=np.float32), name="other.means")
        self._bank_store.add(rows, np.array(other.counts, dtype=np.int64))
        self.n_seen_ += other.n_seen
        return self

    # ------------------------------------------------------------------ query
    def search(self, q: Any, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """k-NN of query rows among the centroids.

        Parameters
        ----------
        q : array or tensor [n, dim]
        k : int, number of neighbours.

        Returns
        -------
        distances : float32 [n, k], plain L2 (not squared); inf where K < k.
        ids : int64 [n, k]; -1 where K < k.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            msg = f"k must be a positive integer, got {k!r}."
            raise ValueError(msg)
        if len(self) == 0:
            msg = "the bank is empty: add training vectors before searching."
            raise ValueError(msg)
        rows = self._check_rows(q, name="q")
        n = rows.shape[0]
        if n == 0:
            return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
        sq, ids = self._bank_store.search(rows, int(k))
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape[1] < k:
            pad = k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            sq = np.pad(sq, ((0, 0), (0, pad)))
        dist = np.sqrt(np.maximum(np.asarray(sq, dtype=np.float32), 0.0))
        dist[ids < 0] = np.inf
        return dist, ids

    def predict(self, X: Any) -> np.ndarray:
        """Nearest centroid id of each row, int64 [n]."""
        return self.search(X, k=1)[1][:, 0]

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> None:
        """Write the bank atomically to an HDF5 file (see :mod:`ocbank.checkpoint`)."""
        checkpoint.write_bank(
            path,
            means=np.asarray(self.means),
            counts=np.asarray(self.counts),
            radius=self.radius,
            n_seen=self.n_seen,
            metadata=metadata if metadata is not None else getattr(self, "metadata_", {}),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu") -> ClusterBank:
        """Read and validate a bank file; raise :class:`CheckpointError` if it is unusable."""
        return cls.from_state(checkpoint.read_bank(path), device=device)

    @classmethod
    def from_state(cls, state: checkpoint.BankState, device: str = "cpu") -> ClusterBank:
        """A bank holding ``state``'s centroids, counts, n_seen and metadata."""
        bank = cls(dim=state.dim, radius=state.radius, device=device)
        if state.means.shape[0]:
            bank._bank_store.set_state(state.means, state.counts)
        else:
            bank._bank_store  # noqa: B018  (creates the empty store)
        bank.n_seen_ = state.n_seen
        bank.metadata_ = state.metadata
        return bank
