"""DataLoader worker setup: single-threaded, and gone as soon as the parent process is.

A spawned worker is a separate process; if its parent is SIGKILLed (OOM killer, a
scheduler's timeout) nothing tells it to stop, and each keeps its memory (torch, decoded images) alive. Two
guards, because either alone has a gap:

- Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the worker the moment
  its parent *thread* exits (so iterate a loader in the thread that created it);
- a daemon watchdog thread, portable: it exits the worker when ``os.getppid()``
  changes (the worker was re-parented), checking every :data:`WATCHDOG_PERIOD_S`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

import torch

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WATCHDOG_PERIOD_S = 0.5


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(WATCHDOG_PERIOD_S)
    os._exit(1)  # the parent is gone: no cleanup can reach anyone now


def start_watchdog(parent_pid: int) -> threading.Thread:
    """A daemon thread that ends this process once its parent is no longer ``parent_pid``."""
    thread = threading.Thread(target=_watch, args=(parent_pid,), name="ocbank-parent-watchdog", daemon=True)
    thread.start()
    return thread


def worker_init(_worker_id: int, parent_pid: int) -> None:
    """``worker_init_fn`` for ocbank's loaders (bind ``parent_pid`` with functools.partial)."""
    # OpenMP thread pools and fork do not mix (loaders spawn for that reason): one thread per worker.
    torch.set_num_threads(1)
    set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    start_watchdog(parent_pid)
