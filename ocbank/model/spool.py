"""A bounded-memory buffer of feature rows, so a build needs only one pass over the images.

The radius rule needs the sampled images' features before the bank can start;
instead of running those images through the backbone twice, their features are
appended to a :class:`FeatureSpool` while they stream, the radius is estimated on
the spool (:func:`ocbank.model.radius.estimate_radius` accepts it), and then the
spool's rows are replayed, in order, into the bank.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import numpy as np

from ..errors import InputError, InputTypeError, NotFittedError

DEFAULT_CHUNK_ROWS = 8192


class FeatureSpool:
    """Append-only float32 rows [n, dim]: in memory up to ``max_memory_bytes``, the rest in a memory-mapped file.

    The first rows fill the memory part (never more than ``max_memory_bytes``);
    rows beyond it are appended to a temporary file in ``spill_dir`` (the system
    temp dir by default), read back through ``np.memmap``. Rows come back in
    append order (:meth:`iter_chunks`, :meth:`take`). The file is deleted by
    :meth:`close`, on leaving a ``with`` block (also on error) and when the spool
    is garbage collected.
    """

    def __init__(self, dim: int, max_memory_bytes: int, spill_dir: str | os.PathLike[str] | None = None) -> None:
        if not (isinstance(dim, int) and not isinstance(dim, bool) and dim > 0):
            msg = f"dim must be a positive integer, got {dim!r}. Pass the feature width, e.g. 1536."
            raise InputError(msg)
        if not (isinstance(max_memory_bytes, int) and not isinstance(max_memory_bytes, bool) and max_memory_bytes >= 0):
            msg = f"max_memory_bytes must be an integer >= 0, got {max_memory_bytes!r}. Use e.g. 2 * 1024**3."
            raise InputError(msg)
        if spill_dir is not None and not Path(spill_dir).is_dir():
            msg = f"spill_dir {str(spill_dir)!r} is not a directory. Create it or pass None for the temp dir."
            raise InputError(msg)
        self.dim = dim
        self.max_memory_bytes = max_memory_bytes
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self._row_bytes = 4 * dim
        self._memory: list[np.ndarray] = []  # [rows_i, dim] float32 blocks
        self._memory_rows = 0
        self._file_rows = 0
        self._fh = None
        self.path: Path | None = None
        self._map: np.memmap | None = None
        self._closed = False

    # ------------------------------------------------------------------ sizes
    @property
    def n_rows(self) -> int:
        return self._memory_rows + self._file_rows

    @property
    def n_memory_rows(self) -> int:
        return self._memory_rows

    @property
    def n_spilled_rows(self) -> int:
        return self._file_rows

    @property
    def memory_bytes(self) -> int:
        """Bytes of rows held in memory (<= max_memory_bytes)."""
        return self._memory_rows * self._row_bytes

    @property
    def spilled(self) -> bool:
        return self._file_rows > 0

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        rows = f"rows={self.n_rows}, in_memory={self._memory_rows}, spilled={self._file_rows}"
        return f"FeatureSpool(dim={self.dim}, {rows})"

    # ------------------------------------------------------------------ write
    def _check_open(self) -> None:
        if self._closed:
            msg = "this FeatureSpool is closed, got a call after close(). Create a new spool."
            raise NotFittedError(msg)

    def append(self, rows: np.ndarray) -> None:
        """Append rows [n, dim] (any float dtype; stored as float32). A torch tensor: pass ``t.cpu().numpy()``."""
        self._check_open()
        if not isinstance(rows, np.ndarray):
            msg = f"rows must be a numpy array [n, {self.dim}], got {type(rows).__name__!r}. Convert with np.asarray."
            raise InputTypeError(msg)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            msg = f"rows must have shape [n, {self.dim}], got {rows.shape!r}. Reshape to (-1, {self.dim})."
            raise InputError(msg)
        if not np.issubdtype(rows.dtype, np.floating):
            msg = f"rows must be floating point, got dtype {rows.dtype!r}. Pass float32 features."
            raise InputTypeError(msg)
        if len(rows) == 0:
            return
        room = 0 if self._file_rows else (self.max_memory_bytes - self.memory_bytes) // self._row_bytes
        head = min(room, len(rows))
        if head:
            self._memory.append(np.array(rows[:head], dtype=np.float32, copy=True))
            self._memory_rows += head
        if head < len(rows):
            self._spill(np.ascontiguousarray(rows[head:], dtype=np.float32))

    def _spill(self, rows: np.ndarray) -> None:
        if self._fh is None:
            fd, name = tempfile.mkstemp(prefix="ocbank-spool-", suffix=".f32", dir=self.spill_dir)
            self.path = Path(name)
            self._fh = os.fdopen(fd, "wb")
        self._fh.write(rows.tobytes())
        self._fh.flush()  # the spilled rows live in the file (page cache), not in a Python buffer
        self._file_rows += len(rows)
        self._map = None  # the map covers the old length; remapped on the next read

    # ------------------------------------------------------------------ read
    def _file_map(self) -> np.memmap:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.float32, mode="r", shape=(self._file_rows, self.dim))
        return self._map

    def iter_chunks(self, rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[np.ndarray]:
        """Yield the rows in append order as float32 arrays [<= rows, dim] (copies; the spool stays unchanged)."""
        self._check_open()
        if rows < 1:
            msg = f"rows per chunk must be >= 1, got {rows!r}. Use e.g. {DEFAULT_CHUNK_ROWS}."
            raise InputError(msg)
        pending: list[np.ndarray] = []
        n_pending = 0
        for block in self._memory:
            start = 0
            while start < len(block):
                take = min(rows - n_pending, len(block) - start)
                pending.append(block[start : start + take])
                n_pending += take
                start += take
                if n_pending == rows:
                    yield np.concatenate(pending)
                    pending, n_pending = [], 0
        if self._file_rows:
            fmap = self._file_map()
            start = 0
            while start < len(fmap):
                take = min(rows - n_pending, len(fmap) - start)
                pending.append(np.asarray(fmap[start : start + take]))
                n_pending += take
                start += take
                if n_pending == rows:
                    yield np.concatenate(pending)
                    pending, n_pending = [], 0
        if n_pending:
            yield np.concatenate(pending)

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows [len(indices), dim] float32 at the given positions (in append order)."""
        self._check_open()
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= self.n_rows)):
            msg = f"indices must be 1-d positions in [0, {self.n_rows}), got {indices!r}. Check the row count."
            raise InputError(msg)
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        in_mem = idx < self._memory_rows
        if in_mem.any():
            bounds = np.cumsum([0] + [len(b) for b in self._memory])
            pos = np.flatnonzero(in_mem)
            block = np.searchsorted(bounds, idx[pos], side="right") - 1
            for b in np.unique(block):
                sel = block == b
                out[pos[sel]] = self._memory[b][idx[pos[sel]] - bounds[b]]
        if (~in_mem).any():
            out[~in_mem] = self._file_map()[idx[~in_mem] - self._memory_rows]
        return out

    def to_array(self) -> np.ndarray:
        """All rows [n, dim] float32 in one array (only for spools that fit in memory)."""
        chunks = list(self.iter_chunks(max(self.n_rows, 1)))
        return chunks[0] if chunks else np.empty((0, self.dim), dtype=np.float32)

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Drop the rows and delete the spill file (idempotent)."""
        self._memory = []
        self._map = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> FeatureSpool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
            pass
