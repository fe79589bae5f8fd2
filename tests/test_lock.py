"""The build lock: exactly one winner among racing builds, takeover after SIGKILL, holder named."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ocbank.errors import BuildLockError
from ocbank.jobs.lock import LOCK_NAME, build_lock

N_PROCS, N_ROUNDS, HOLD_S = 8, 5, 0.4


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _contender(out: str, barrier, results) -> None:  # noqa: ANN001 - multiprocessing proxies
    barrier.wait()
    try:
        with build_lock(Path(out)):
            results.put(("won", os.getpid()))
            time.sleep(HOLD_S)  # every other contender tries while this one holds it
    except BuildLockError:
        results.put(("lost", os.getpid()))


@pytest.mark.parametrize("round_", range(N_ROUNDS))
def test_racing_builds_on_a_stale_lock_have_exactly_one_winner(tmp_path, round_):
    out = tmp_path / "o"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename}))
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(N_PROCS), ctx.Queue()
    procs = [ctx.Process(target=_contender, args=(str(out), barrier, results)) for _ in range(N_PROCS)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [o for o, _ in outcomes].count("won") == 1, outcomes
    assert not (out / LOCK_NAME).exists()  # the winner cleaned up


def test_lock_of_a_sigkilled_build_is_free_and_a_live_one_is_named(tmp_path):
    out = tmp_path / "o"
    code = (
        "import sys, time; from pathlib import Path; from ocbank.jobs.lock import build_lock\n"
        f"with build_lock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BuildLockError) as info:
            with build_lock(out):
                pass
        assert f"pid {holder.pid}" in str(info.value) and str(out) in str(info.value)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    finally:
        holder.kill()
    assert (out / LOCK_NAME).exists()  # left behind by the killed build ...
    with build_lock(out):  # ... and free at once: the kernel released its flock
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()
