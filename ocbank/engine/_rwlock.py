"""A small writer-preferring readers-writer lock (threads only)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers.

    Both kinds of holder may re-enter (the writer as reader or writer, a reader
    as reader), so a property called while the lock is held cannot deadlock.
    Readers must not upgrade to writers.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers: dict[int, int] = {}  # thread id -> depth
        self._writer: int | None = None  # thread id of the writer
        self._depth = 0
        self._waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._depth += 1
                mine = True
            elif me in self._readers:
                self._readers[me] += 1
                mine = False
            else:
                while self._writer is not None or self._waiting:
                    self._cond.wait()
                self._readers[me] = 1
                mine = False
        try:
            yield
        finally:
            with self._cond:
                if mine:
                    self._depth -= 1
                else:
                    self._readers[me] -= 1
                    if not self._readers[me]:
                        del self._readers[me]
                        if not self._readers:
                            self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._depth += 1
            else:
                if me in self._readers:  # it would wait for itself forever
                    msg = "cannot take the write lock while holding the read lock (no upgrades). Release it first."
                    raise RuntimeError(msg)
                self._waiting += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
                self._writer = me
                self._depth = 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer = None
                    self._cond.notify_all()
