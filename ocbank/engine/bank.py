"""ClusterBank: the online cluster memory bank (the method's Algorithm 1)."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..errors import InputError, InputTypeError
from . import checkpoint
from ._rwlock import RWLock
from .cpu_search import resolve_cpu_search
from .device import resolve_device
from .ivf import IvfSearch, use_ivf
from .knn import CPU_SEARCHES
from .store import NO_LIMIT, CpuStore, Store, TorchStore, resolve_search

_DEVICES = ("cpu", "cuda", "auto")
# "auto": exact flat search, or IVF (approximate) on CPU from ivf.IVF_MIN_CENTROIDS centroids on.
SEARCH_INDEXES = ("auto", "flat", "ivf")
# IVF answers k-NN queries up to this k; larger k always searches exactly.
IVF_MAX_K = 64
# The largest k a search accepts: faiss's GPU k-selection limit, applied on every
# device so that a bank behaves the same everywhere (and k=10**9 never allocates).
MAX_K = 2048


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "is_floating_point")


def check_radius(radius: Any, name: str = "radius") -> float:
    """``radius`` as a float that is finite, > 0 and has a finite, non-zero square."""
    if isinstance(radius, bool) or not isinstance(radius, (int, float, np.floating, np.integer)):
        msg = f"{name} must be a positive number, got {radius!r}. Pass e.g. {name}=26.0."
        raise InputTypeError(msg)
    r = float(radius)
    if not math.isfinite(r) or r <= 0:
        msg = f"{name} must be finite and > 0, got {radius!r}. Pass e.g. {name}=26.0."
        raise InputError(msg)
    if not (math.isfinite(r * r) and r * r > 0):
        msg = f"{name}={radius!r} has a squared value that over- or underflows float64. Pass a radius in 1e-150..1e150."
        raise InputError(msg)
    return r


class ClusterBank:
    """Streaming nearest-centroid memory bank with radius ``radius``.

    For each arriving vector x (in arrival order) the nearest centroid mu_k is
    found (ties: lowest index). If ``||x - mu_k|| <= radius`` it absorbs x with
    a Welford update ``n_k += 1; M2_k += n/(n+1) ||x - mu_k||^2; mu_k += (x - mu_k) / n_k``;
    otherwise x becomes a new centroid with count 1 and M2 0. Batches are
    searched at once with FAISS and the dependencies inside a batch are resolved
    exactly, so ``add`` gives the same bank as adding rows one at a time,
    whatever the batch split.

    With ``max_centroids=N``, when the next vector would make centroid N + 1,
    the radius is multiplied by ``radius_growth`` and the existing centroids are
    re-clustered at the new radius (streamed as weighted points with their M2,
    in index order: the merge path), repeatedly until fewer than N remain; then
    streaming goes on from that same vector. The bank never holds more than N
    centroids. Fitting never changes the ``radius`` it was given: the radius it absorbs at
    now is the fitted ``radius_``, and every raise is recorded in ``radius_history_``.

    Thread safety: one readers-writer lock per bank. ``add``, ``fit``,
    ``partial_fit``, ``merge``, ``save`` and ``load_state`` are writers and
    run one at a time; ``search``, ``predict`` and the ``means``/``counts``/``m2``
    snapshots are readers and may run together (a GPU store still serialises
    its own searches, as faiss GPU resources require).

    Parameters
    ----------
    dim : int
        Feature dimension (1536 for WideResNet-50 layer2+layer3).
    radius : float
        Absorption radius r, in plain (not squared) L2 units; finite, > 0, with a finite square.
    device : {"cpu", "cuda", "cuda:N", "auto"}
        Where means live and where searches run.
    max_centroids : int or None
        Hard cap N >= 2 on the number of centroids; None for no cap.
    radius_growth : float
        Factor > 1 applied to the radius each time the cap is hit.
    search_index : {"auto", "flat", "ivf"}
        CPU k-NN search of a large bank (see :meth:`search`).
    gpu_search : {"auto", "faiss", "torch"}
        How a CUDA bank searches: ``faiss.knn_gpu`` (needs a faiss GPU build) or torch
        (a GEMM plus ``topk``; works with faiss-cpu); "auto" picks faiss when its GPU
        build is present (and the precision is fp32), else torch. On ``device="cpu"``,
        "torch" runs that same torch store on CPU tensors (for tests and checks;
        the CPU store is faster there); "auto" and "faiss" use the CPU store.
    cpu_search : {"auto", "faiss", "torch", "numpy"}
        Whose GEMM runs the CPU store's exact searches (adding and ``search``):
        faiss's (the BLAS inside the faiss wheel), torch's or numpy's. "auto" takes the fastest
        on this machine, measured once and cached (:mod:`ocbank.engine.cpu_search`). All
        give the same bank and the same squared fp32 distances; IVF search (see
        ``search_index``) always runs on faiss.
    gpu_search_precision : {"fp32", "fp16", "bf16"}
        Precision of the torch search's candidate GEMM. fp16/bf16 candidates are
        re-checked in exact fp32 (adds decide on fp32 distances; searches re-rank
        the top candidates in fp32), so only a true nearest centroid that the
        half-precision GEMM ranks outside the candidate list can be missed.
    """

    def __init__(
        self,
        dim: int,
        radius: float,
        device: str = "cpu",
        max_centroids: int | None = None,
        radius_growth: float = 1.25,
        search_index: str = "auto",
        gpu_search: str = "auto",
        gpu_search_precision: str = "fp32",
        cpu_search: str = "auto",
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            msg = f"dim must be a positive integer, got {dim!r}. Pass the feature size, e.g. dim=1536."
            raise InputTypeError(msg)
        if dim <= 0:
            msg = f"dim must be a positive integer, got {dim!r}. Pass the feature size, e.g. dim=1536."
            raise InputError(msg)
        r = check_radius(radius)
        if not isinstance(device, str) or not (device in _DEVICES or device.startswith("cuda:")):
            msg = f"device must be one of 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}."
            raise InputError(msg)
        if max_centroids is not None and (
            isinstance(max_centroids, bool) or not isinstance(max_centroids, (int, np.integer)) or max_centroids < 2
        ):
            msg = (
                f"max_centroids must be None or an integer >= 2, got {max_centroids!r}. "
                "Pass e.g. max_centroids=100_000."
            )
            raise InputError(msg)
        growth = check_radius(radius_growth, "radius_growth")
        if growth <= 1.0:
            msg = f"radius_growth must be > 1, got {radius_growth!r}. Pass e.g. radius_growth=1.25."
            raise InputError(msg)
        self.dim = int(dim)
        self.radius = r  # the hyperparameter: fitting never changes it
        self.radius_ = r  # the radius the bank absorbs at now: the cap grows it (radius_history_)
        self.device = device
        self.max_centroids = None if max_centroids is None else int(max_centroids)
        self.radius_growth = growth
        if search_index not in SEARCH_INDEXES:
            msg = f"search_index must be one of {SEARCH_INDEXES}, got {search_index!r}."
            raise InputError(msg)
        self.search_index = search_index
        resolve_search(gpu_search, "cpu", gpu_search_precision)  # validates both names
        self.gpu_search = gpu_search
        self.gpu_search_precision = gpu_search_precision
        if cpu_search not in CPU_SEARCHES:
            msg = f"cpu_search must be one of {CPU_SEARCHES}, got {cpu_search!r}. Use 'auto'."
            raise InputError(msg)
        self.cpu_search = cpu_search
        self._ivf: IvfSearch | None = None
        self.radius_history_: list[dict[str, Any]] = []
        self.spread_known_ = True
        self._lock = RWLock()
        self._init_lock = threading.Lock()
        # Test hook: called with the operation's name once a writer holds the lock.
        self._on_write: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ state
    def _new_store(self) -> Store:
        device = resolve_device(self.device)
        search = resolve_search(self.gpu_search, device, self.gpu_search_precision)
        if device == "cpu" and search == "faiss":
            return CpuStore(self.dim, self.radius_, search=resolve_cpu_search(self.cpu_search))
        return TorchStore(self.dim, self.radius_, device, search=search, precision=self.gpu_search_precision)

    @property
    def _bank_store(self) -> Store:
        store = self.__dict__.get("store_")
        if store is None:
            with self._init_lock:
                store = self.__dict__.get("store_")
                if store is None:
                    store = self._new_store()
                    self.n_seen_ = 0
                    self.store_ = store
        return store

    @contextmanager
    def _writing(self, op: str) -> Iterator[None]:
        """Hold the write lock; tell the test hook which operation got it."""
        with self._lock.write():
            if self._on_write is not None:
                self._on_write(op)
            if op != "save":  # the centroids may change: an IVF index built on them is stale
                self._ivf = None
            yield

    @property
    def device_in_use(self) -> str:
        """The concrete device in use ("cpu" or "cuda[:N]")."""
        store = self._bank_store
        return "cpu" if isinstance(store, CpuStore) else str(store.device)

    @property
    def search_backend(self) -> dict[str, str]:
        """Which search this bank runs: {"device", "search": "faiss" | "torch" | "numpy" (CPU only), "precision"}.

        Detectors write it into their bank file's metadata; builds into their summaries.
        On a CPU bank "search" is ``cpu_search`` resolved ("auto": the fastest measured here).
        """
        store = self._bank_store
        if isinstance(store, TorchStore):
            return {"device": str(store.device), "search": store.search_backend, "precision": store.precision}
        return {"device": "cpu", "search": store.search_backend, "precision": "fp32"}

    @property
    def uses_ivf(self) -> bool:
        """Whether searches with k <= IVF_MAX_K go through the approximate IVF index (CPU banks, by ``search_index``)."""
        use = self.search_index == "ivf" or (self.search_index == "auto" and use_ivf(len(self)))
        return use and isinstance(self._bank_store, CpuStore)

    def __len__(self) -> int:
        store = self.__dict__.get("store_")
        return 0 if store is None else store.size

    def __repr__(self) -> str:
        cap = "" if self.max_centroids is None else f", max_centroids={self.max_centroids}"
        search = "" if self.gpu_search == "auto" else f", gpu_search={self.gpu_search!r}"
        if self.gpu_search_precision != "fp32":
            search += f", gpu_search_precision={self.gpu_search_precision!r}"
        if self.cpu_search != "auto":
            search += f", cpu_search={self.cpu_search!r}"
        # The search in use once the store exists (asking earlier would run cpu_search's measurement).
        store = self.__dict__.get("store_")
        runs = "" if store is None else f", searched with {self.search_backend['search']}"
        grown = f" (grown to radius_={self.radius_})" if self.radius_ != self.radius else ""
        return (
            f"ClusterBank(dim={self.dim}, radius={self.radius}, device={self.device!r}{cap}{search}) "
            f"with {len(self)} centroids from {self.n_seen} vectors{runs}{grown}"
        )

    @property
    def means(self) -> np.ndarray:
        """Centroids, float32 [K, dim] (read-only view on CPU, a copy from GPU).

        The CPU view follows later adds; while other threads add, take
        :meth:`state` for a consistent copy of means, counts and m2 together.
        """
        if "store_" not in self.__dict__:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock.read():
            return self._bank_store.means

    @property
    def counts(self) -> np.ndarray:
        """Vectors absorbed per centroid, int64 [K] (read-only)."""
        if "store_" not in self.__dict__:
            return np.zeros(0, dtype=np.int64)
        with self._lock.read():
            return self._bank_store.counts

    @property
    def m2(self) -> np.ndarray:
        """Welford second moment per centroid, float64 [K]: sum of ||x - mu||^2 over its members (read-only).

        Zeros for centroids loaded from a version-1 file (see ``spread_known_``).
        """
        if "store_" not in self.__dict__:
            return np.zeros(0, dtype=np.float64)
        with self._lock.read():
            return self._bank_store.m2

    @property
    def spread(self) -> np.ndarray:
        """RMS distance of each centroid's members to it, sqrt(m2 / n), float64 [K].

        All NaN when the bank holds centroids whose m2 was never tracked
        (``spread_known_`` is False, e.g. continued from a version-1 file).
        """
        with self._lock.read():
            m2, counts = self.m2, self.counts
            if not self.spread_known_:
                return np.full(m2.shape, np.nan)
            return np.sqrt(m2 / np.maximum(counts, 1))

    @property
    def n_seen(self) -> int:
        """Vectors consumed so far (the sum of counts)."""
        return int(self.__dict__.get("n_seen_", 0))

    @property
    def nbytes(self) -> int:
        """Bytes held by means and counts (K * (4 * dim + 8)); m2 adds K * 8 more, not counted here.

        Kept as means + counts because build/evaluate summaries report it as ``bank_bytes``.
        """
        return len(self) * (4 * self.dim + 8)

    # ------------------------------------------------------------------ input
    def _check_rows(self, x: Any, name: str = "x") -> Any:
        """Validate [n, dim] real input; return it as float32 rows for the store.

        float16, bfloat16, float64 and integers (numpy or torch) are converted to float32.
        """
        store = self._bank_store
        if _is_torch_tensor(x):
            import torch  # noqa: PLC0415

            if x.dtype == torch.bool or x.is_complex():
                msg = f"{name} must be a real numeric tensor, got dtype {x.dtype}. Convert with x.float()."
                raise InputTypeError(msg)
            shape = tuple(x.shape)
        else:
            if not isinstance(x, np.ndarray):
                x = np.asarray(x)
            if x.dtype.name == "bfloat16":  # ml_dtypes' numpy bfloat16 (kind 'V')
                x = x.astype(np.float32)
            if x.dtype.kind not in "fiu":
                msg = (
                    f"{name} must be a real numeric array, got dtype {x.dtype}. "
                    "Convert with x.astype(np.float32)."
                )
                raise InputTypeError(msg)
            shape = x.shape
        if len(shape) != 2 or shape[1] != self.dim:
            msg = f"{name} must have shape [n, {self.dim}], got {shape}. Reshape to (-1, {self.dim})."
            raise InputError(msg)
        if isinstance(store, CpuStore):
            if _is_torch_tensor(x):
                import torch  # noqa: PLC0415

                # Convert on the tensor's side: numpy has no bfloat16.
                x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
            rows = np.ascontiguousarray(x, dtype=np.float32)
            bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
        else:
            import torch  # noqa: PLC0415

            if not _is_torch_tensor(x):
                x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            rows = x.detach().to(device=store.device, dtype=torch.float32).contiguous()
            bad = torch.nonzero(~torch.isfinite(rows).all(dim=1)).flatten().cpu().numpy()
        if bad.size:
            msg = (
                f"{name} has {bad.size} row(s) with NaN or inf values (first at row {bad[0]}). "
                "Drop or repair those rows before adding; the bank was not changed."
            )
            raise InputError(msg)
        return rows

    # ------------------------------------------------------------------ build
    def _absorb_capped(self, rows: Any, weights: np.ndarray, pm2: np.ndarray | None) -> None:
        """Feed weighted rows through the store, re-clustering whenever the cap is hit (write lock held)."""
        n = rows.shape[0]
        limit = NO_LIMIT if self.max_centroids is None else self.max_centroids
        pos = 0
        while True:
            store = self._bank_store
            part_m2 = None if pm2 is None else pm2[pos:]
            pos += store.absorb(rows[pos:], weights[pos:], part_m2, limit)
            if pos >= n:
                return
            self._coarsen(self.n_seen_ + int(weights[:pos].sum()))

    def _coarsen(self, seen: int) -> None:
        """Raise the radius and re-cluster the centroids until fewer than max_centroids remain."""
        store = self._bank_store
        while True:
            old = self.radius_
            new = old * self.radius_growth
            if not math.isfinite(new * new):
                msg = (
                    f"max_centroids={self.max_centroids} cannot be kept: the radius would grow past {old!r}. "
                    "Raise max_centroids or check the input for huge values."
                )
                raise InputError(msg)
            means, counts, m2 = store.state()
            k_before = store.size
            store.r2 = new * new
            store.size = 0
            # The merge path: centroids as points of weight n carrying their M2.
            store.absorb(store.rows(means), counts, m2)
            self.radius_ = new
            self.radius_history_.append(
                {"n_seen": int(seen), "old": old, "new": new, "k_before": int(k_before), "k_after": int(store.size)}
            )
            if store.size < self.max_centroids:
                return

    def add(self, x: Any) -> ClusterBank:
        """Stream rows of ``x`` [n, dim] (numpy or torch; float16/bfloat16/float32/float64/int) into the bank.

        A rejected call leaves the bank unchanged. An empty batch is a no-op.
        """
        with self._writing("add"):
            self._add_locked(x)
        return self

    def _add_locked(self, x: Any) -> None:
        rows = self._check_rows(x)
        n = rows.shape[0]
        if n:
            self._absorb_capped(rows, np.ones(n, dtype=np.int64), None)
            self.n_seen_ += n

    def partial_fit(self, X: Any, y: None = None) -> ClusterBank:
        """scikit-learn alias of :meth:`add`."""
        return self.add(X)

    def fit(self, X: Any, y: None = None) -> ClusterBank:
        """Reset the bank (a capped bank goes back to its first radius), then stream ``X`` [n, dim] into it."""
        with self._writing("fit"):
            self.radius_ = self.radius
            self.__dict__.pop("store_", None)
            self.__dict__.pop("n_seen_", None)
            self.spread_known_ = True
            self.radius_history_ = []
            self._add_locked(X)
        return self

    def merge(self, other: ClusterBank) -> ClusterBank:
        """Fold ``other``'s centroids into this bank, in ``other``'s index order.

        Each centroid of ``other`` (mu_b, n_b, M2_b) is streamed as a point of
        weight n_b: absorbed by the nearest centroid within r
        (``mu += n_b (mu_b - mu) / (n + n_b)``, ``M2 += M2_b + ||mu_b - mu||^2 n n_b / (n + n_b)``)
        or appended as it is. The cap applies as in :meth:`add`.
        """
        if not isinstance(other, ClusterBank):
            msg = f"merge expects a ClusterBank, got {type(other).__name__}. Pass a ClusterBank."
            raise InputTypeError(msg)
        if other.dim != self.dim:
            msg = (
                f"cannot merge a bank of dim {other.dim} into one of dim {self.dim}. "
                "Build both with the same features."
            )
            raise InputError(msg)
        # Snapshot other under its own read lock first: no lock-order deadlock, and merge(self) works.
        snap = other.state()
        means, counts, m2 = snap.means, snap.counts, snap.m2
        with self._writing("merge"):
            # Checked under the lock, on the snapshot: a concurrent add may raise either radius (cap).
            if snap.radius != self.radius_:
                msg = (
                    f"cannot merge a bank of radius {snap.radius} into one of radius {self.radius_}. "
                    "Build both with the same radius."
                )
                raise InputError(msg)
            if len(counts) == 0:
                return self
            rows = self._check_rows(means, name="other.means")
            self._absorb_capped(rows, counts, m2)
            self.n_seen_ += snap.n_seen
            self.spread_known_ = self.spread_known_ and snap.spread_known
        return self

    # ------------------------------------------------------------------ query
    def search(self, q: Any, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """k-NN of query rows among the centroids.

        Parameters
        ----------
        q : array or tensor [n, dim]
            Query rows.
        k : int
            Number of neighbours, 1 <= k <= 2048 (:data:`MAX_K`).

        Returns
        -------
        distances : float32 [n, k]
            Plain L2 (not squared); inf where K < k.
        ids : int64 [n, k]
            Centroid ids; -1 where K < k.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
            msg = f"k must be an integer in 1..{MAX_K}, got {k!r}. Ask for fewer neighbours."
            raise InputError(msg)
        with self._lock.read():
            if len(self) == 0:
                msg = "the bank is empty: add training vectors before searching."
                raise InputError(msg)
            rows = self._check_rows(q, name="q")
            n = rows.shape[0]
            if n == 0:
                return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
            ivf = self._ivf_index() if k <= IVF_MAX_K else None
            if ivf is not None and k <= len(self):
                sq, ids = ivf.search(rows, int(k))
                short = np.flatnonzero((ids < 0).any(axis=1))  # the probed lists held fewer than k
                if short.size:
                    sq[short], ids[short] = self._bank_store.search(rows[short], int(k))
            else:
                sq, ids = self._bank_store.search(rows, int(k))
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape[1] < k:
            pad = k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            sq = np.pad(sq, ((0, 0), (0, pad)))
        dist = np.sqrt(np.maximum(np.asarray(sq, dtype=np.float32), 0.0))
        dist[ids < 0] = np.inf
        return dist, ids

    def _ivf_index(self) -> IvfSearch | None:
        """The approximate index for large CPU banks (``search_index``), built on first use after a change.

        Called under the read lock, so the centroids cannot change while it is built or used.
        """
        if not self.uses_ivf:
            return None
        with self._init_lock:
            if self._ivf is None:
                self._ivf = IvfSearch.from_means(np.ascontiguousarray(self._bank_store.means))
            return self._ivf

    def predict(self, X: Any) -> np.ndarray:
        """Nearest centroid id of each row, int64 [n]."""
        return self.search(X, k=1)[1][:, 0]

    # ------------------------------------------------------------------ files
    def state(self, metadata: dict[str, Any] | None = None) -> checkpoint.BankState:
        """A consistent snapshot (copies) of everything a bank file holds."""
        with self._lock.read():
            if "store_" in self.__dict__:
                means, counts, m2 = self._bank_store.state()
            else:
                means = np.zeros((0, self.dim), np.float32)
                counts, m2 = np.zeros(0, np.int64), np.zeros(0, np.float64)
            return checkpoint.BankState(
                means,
                counts,
                self.radius_,
                self.dim,
                self.n_seen,
                metadata if metadata is not None else getattr(self, "metadata_", {}),
                m2,
                self.spread_known_,
                self.max_centroids,
                self.radius_growth,
                [dict(h) for h in self.radius_history_],
            )

    def save(self, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> None:
        """Write the bank atomically to an HDF5 file (see :mod:`ocbank.engine.checkpoint`).

        The state is checked before anything is written: an inconsistent bank
        raises :class:`~ocbank.errors.CheckpointError` and leaves ``path`` as it was.
        """
        with self._writing("save"):
            checkpoint.write_bank(path, self.state(metadata))

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu", **search: str) -> ClusterBank:
        """Read and validate a bank file; raise :class:`CheckpointError` if it is unusable.

        ``search`` takes ``search_index``, ``gpu_search``, ``gpu_search_precision`` and ``cpu_search`` (see the class).
        """
        return cls.from_state(checkpoint.read_bank(path), device=device, **search)

    @classmethod
    def from_state(cls, state: checkpoint.BankState, device: str = "cpu", **search: str) -> ClusterBank:
        """A bank holding ``state``'s centroids, counts, m2, n_seen, cap, radius history and metadata."""
        bank = cls(
            dim=state.dim,
            radius=state.radius_history[0]["old"] if state.radius_history else state.radius,
            device=device,
            max_centroids=state.max_centroids,
            radius_growth=state.radius_growth,
            **search,
        )
        return bank.load_state(state)

    def load_state(self, state: checkpoint.BankState) -> ClusterBank:
        """Replace this bank's contents with ``state`` (same dim); radius and cap follow the state."""
        if state.dim != self.dim:
            msg = f"state has dim {state.dim}, this bank dim {self.dim}. Load it into a bank of dim {state.dim}."
            raise InputError(msg)
        with self._writing("load_state"):
            k = state.means.shape[0]
            m2 = np.zeros(k, np.float64) if state.m2 is None else np.asarray(state.m2, dtype=np.float64)
            self.radius_ = check_radius(state.radius)
            self.radius = float(state.radius_history[0]["old"]) if state.radius_history else self.radius_
            self.max_centroids = state.max_centroids
            self.radius_growth = float(state.radius_growth)
            self.__dict__.pop("store_", None)
            store = self._bank_store
            if k:
                store.set_state(state.means, np.asarray(state.counts, dtype=np.int64), m2)
            self.n_seen_ = int(state.n_seen)
            self.metadata_ = state.metadata
            self.spread_known_ = bool(state.spread_known and state.m2 is not None)
            self.radius_history_ = [dict(h) for h in state.radius_history]
        return self
