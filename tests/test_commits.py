"""pipeline/commits.py: a finished block is written on a worker thread while the next computes,
in order, one at a time, with its errors raised in the run's thread."""
from __future__ import annotations

import threading
import time

import pytest

from gptqkit.pipeline.commits import Commits


def test_jobs_run_in_order_one_at_a_time_off_the_main_thread():
    c = Commits(background=True)
    log, running = [], []

    def job(k):
        def run():
            running.append(k)
            assert len(running) == 1, "two jobs at once"
            time.sleep(0.02)
            log.append((k, threading.current_thread() is threading.main_thread()))
            running.remove(k)
        return run
    for k in range(5):
        c.submit(job(k))
    c.wait()
    assert log == [(k, False) for k in range(5)]


def test_submit_returns_before_the_job_ends():
    c = Commits(background=True)
    gate = threading.Event()
    c.submit(gate.wait)
    assert c._thread is not None and c._thread.is_alive()  # the caller goes on computing
    gate.set()
    c.wait()


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_error_raised_at_next_submit_or_wait(exc):
    c = Commits(background=True)

    def bad():
        raise exc
    c.submit(bad)
    ran = []
    with pytest.raises(type(exc)):
        c.submit(lambda: ran.append(1))  # the failed block is not followed by the next commit
    assert not ran
    c.wait()  # reported once


def test_foreground_runs_inside_submit():
    c = Commits(background=False)
    where = []
    c.submit(lambda: where.append(threading.current_thread() is threading.main_thread()))
    assert where == [True]


def test_wait_with_timeout_leaves_a_stuck_job():
    """Ctrl-C must not hang on a write that does not finish (driver._settle waits a bounded time)."""
    c = Commits(background=True)
    gate = threading.Event()
    c.submit(gate.wait)
    assert c.wait(0.05) is False
    gate.set()
    assert c.wait() is True


def test_settle_waits_once_for_a_stuck_write(monkeypatch):
    """Ctrl-C settles in quantize_model's except and again in its finally: a stuck write costs
    one SETTLE_SECONDS, not two."""
    from gptqkit.pipeline import driver
    monkeypatch.setattr(driver, "SETTLE_SECONDS", 0.2)
    c = Commits(background=True)
    gate = threading.Event()
    c.submit(gate.wait)
    t = time.perf_counter()
    driver._settle(c)
    driver._settle(c)
    assert time.perf_counter() - t < 0.35
    gate.set()
