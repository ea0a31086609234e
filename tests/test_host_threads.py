"""hyv3_graph/host_threads.py: busy pollers are found and moved to SCHED_IDLE (MAX's log-flush thread among
them once a model has executed), and `wait_until_quiet` waits for a spinning thread and not for an idle one."""

import sys
import threading
import time

import pytest

from hyv3_graph import host_threads

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread clocks and SCHED_IDLE: Linux")


def _thread(target):
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def test_a_polling_thread_is_demoted_and_a_sleeping_one_is_not():
    stop = threading.Event()
    poller = _thread(lambda: [stop.wait(0.0001) for _ in iter(lambda: stop.is_set(), True)])
    sleeper = _thread(lambda: stop.wait())
    time.sleep(0.02)
    try:
        demoted = host_threads.demote_busy_pollers()
        assert poller.native_id in demoted
        assert host_threads.is_idle_policy(poller.native_id)
        assert not host_threads.is_idle_policy(sleeper.native_id)
        assert not host_threads.is_idle_policy(threading.get_native_id())
        assert poller.native_id not in host_threads.demote_busy_pollers()  # once per thread
    finally:
        stop.set()
        poller.join()
        sleeper.join()


def test_wait_until_quiet_waits_for_a_spinning_thread_only():
    host_threads.wait_until_quiet()  # MAX's workers may still spin after an earlier test's execute
    assert host_threads.wait_until_quiet() < 0.1  # nothing else runs now

    def spin(seconds=0.25):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            pass

    spinner = _thread(spin)
    waited = host_threads.wait_until_quiet(max_wait_s=2.0)
    spinner.join()
    assert 0.15 < waited < 1.0, waited


def test_thread_cpu_clock_counts_a_threads_own_time():
    me = threading.get_native_id()
    a = host_threads.thread_cpu_ns(me)
    t0 = time.thread_time_ns()
    x = sum(i * i for i in range(200_000))
    used_own, used = time.thread_time_ns() - t0, host_threads.thread_cpu_ns(me) - a
    assert x > 0 and abs(used - used_own) < 0.2 * used_own + 2e6, (used, used_own)


@pytest.mark.slow  # builds (compiles) the tiny engine
def test_max_log_poller_is_demoted_when_an_engine_is_built(engines, tiny_path):
    """MAX 26.7 starts a log-flush thread at a process's first execute that wakes every 100 us; once an engine is
    built (its warm-up step executes) no thread of the process polls that fast at normal priority."""
    eng = engines.get(tiny_path, "custom")
    assert eng.cache.free_pages == eng.cache.total_pages  # the warm-up's scratch sequence was released
    host_threads.wait_until_quiet()
    left = [t for t in host_threads.busy_pollers() if not host_threads.is_idle_policy(t)]
    assert not left, f"threads polling at normal priority after a step: {left}"
    assert host_threads.demoted(), "no busy poller was demoted: has MAX's log-flush thread changed? (host_threads.py)"
