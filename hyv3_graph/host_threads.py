"""The other threads of this process, on a machine with few cores: find MAX's busy poller, wait for spinners.

Two behaviours of MAX 26.7's CPU runtime cost us (and any peer timed in the same process) on 2 cores
(measured on a 2-core Zen 4, docs/perf-notes.md "MAX's host threads"):

- The first `execute` of any model starts a log-flush thread (libmax's `[Logger]`) that waits on a condition
  variable with a 100 us timeout, forever: ~5,800 wake-ups a second, ~10% of a core even when nothing runs, and
  each wake-up preempts whichever thread holds that core. `demote_busy_pollers` moves every thread of the process
  that wakes that often to SCHED_IDLE (it then yields to every normal thread; no privilege needed). A
  `small` decode step: bf16 8.62 -> 7.55 ms, f32 13.6 -> 12.4, q8_0 6.35 -> 5.76 (in-process A/B).
- After an `execute`, MAX's worker threads spin ~130-150 ms before they sleep (numpy's OpenBLAS threads ~110 ms
  after a matmul): whatever runs next in the process (a peer's timed loop, a roofline probe) shares the cores
  with two spinners. `wait_until_quiet` waits until the process's other threads are idle; the bench calls it
  before each timed section.

Per-thread CPU time comes from Linux's per-thread CPU clocks (the clock id glibc's `pthread_getcpuclockid` builds
from a thread id), nanosecond-exact where /proc's tick counts are 10 ms.
"""

from __future__ import annotations

import os
import threading
import time

POLLER_WAKEUPS_PER_S = 2000  # a thread waking more often than this while the process is idle is a busy poller
_demoted: set[int] = set()
_demote_lock = threading.Lock()


def _thread_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return []


def _voluntary_switches(tid: int) -> int | None:
    """How many times the thread has slept (blocked) so far; None once it is gone."""
    try:
        with open(f"/proc/self/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def thread_cpu_ns(tid: int) -> int | None:
    """CPU time the thread has used (ns), None once it is gone. Linux's per-thread CPU clock: ((~tid) << 3) | 6
    (CPUCLOCK_PERTHREAD | CPUCLOCK_SCHED), as glibc's pthread_getcpuclockid builds it."""
    try:
        return time.clock_gettime_ns(((~tid) << 3) | 6)
    except OSError:
        return None


def busy_pollers(window_s: float = 0.02) -> list[int]:
    """Threads of this process that woke more than POLLER_WAKEUPS_PER_S times a second over `window_s` while the
    caller slept. Call it when nothing else runs (between steps): a worker that sleeps and wakes per task would
    count too."""
    before = {t: _voluntary_switches(t) for t in _thread_ids() if t != threading.get_native_id()}
    time.sleep(window_s)
    found = []
    for t, a in before.items():
        b = _voluntary_switches(t)
        if a is not None and b is not None and b - a > POLLER_WAKEUPS_PER_S * window_s:
            found.append(t)
    return found


def demote_busy_pollers() -> list[int]:
    """Moves every busy poller (`busy_pollers`) to SCHED_IDLE, once per thread; returns the threads demoted by this
    call. Linux only (elsewhere a no-op). Idempotent and cheap after the first call (one 20 ms window)."""
    if not hasattr(os, "sched_setscheduler"):
        return []
    with _demote_lock:
        done = []
        for tid in busy_pollers():
            if tid in _demoted:
                continue
            try:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            except OSError:
                continue
            _demoted.add(tid)
            done.append(tid)
        return done


_searched = False


def demote_busy_pollers_once() -> None:
    """`demote_busy_pollers` the first time it is called in this process, nothing after: MAX starts its poller once,
    at the process's first execute, so call it after an execute (the engine's warm-up step, the bench's first graph).
    Saves each later engine build or bench graph the 20 ms search."""
    global _searched
    with _demote_lock:
        if _searched:
            return
        _searched = True
    demote_busy_pollers()


def demoted() -> list[int]:
    """The threads `demote_busy_pollers` moved to SCHED_IDLE so far (some may have exited since)."""
    return sorted(_demoted)


def is_idle_policy(tid: int) -> bool:
    try:
        return os.sched_getscheduler(tid) == os.SCHED_IDLE
    except OSError:
        return False


def wait_until_quiet(max_wait_s: float = 1.0, window_s: float = 0.01, busy_frac: float = 0.05) -> float:
    """Sleeps until the other threads of this process (SCHED_IDLE ones aside) used less than `busy_frac` of one
    core over a `window_s` window, or `max_wait_s` passed; returns the seconds waited (one window where threads
    cannot be listed)."""
    me, t0 = threading.get_native_id(), time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        tids = [t for t in _thread_ids() if t != me and not is_idle_policy(t)]
        before = {t: thread_cpu_ns(t) for t in tids}
        time.sleep(window_s)
        used = sum(b - a for t, a in before.items() if a is not None and (b := thread_cpu_ns(t)) is not None)
        if used < busy_frac * window_s * 1e9:
            break
    return time.perf_counter() - t0
