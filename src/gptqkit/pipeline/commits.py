"""Making finished blocks durable while the next block computes.

A block is durable once its file, the next block's inputs and the run state are written and
fsynced (rundir.py). The fsyncs wait for the disk, ~0.4 s per block for SmolLM2's 75 MB of
hidden states, ~6 % of a run; on a worker thread they overlap the next block's compute.

One job at a time, in submission order: submit() first waits for the previous job, so the run
state never runs ahead of the files, and at most one block's writes are pending. An error in a
job (or a test fault hook's KeyboardInterrupt) is raised in the caller's thread at the next
submit() or wait(). Without `background` (torch.distributed, whose collectives belong to the
main thread; --max-memory, whose forwards write the run folder's hidden states themselves; and
the test fault hooks of rundir.fault_hook, which must fire in the main thread to act like a
signal there) every job runs inside submit().
"""
from __future__ import annotations

import threading
from typing import Callable


class Commits:
    def __init__(self, background: bool):
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        if not self.background:
            job()
            return

        def run() -> None:
            try:
                job()
            except BaseException as e:  # re-raised by wait() in the caller's thread
                self._error = e
        self._thread = threading.Thread(target=run, name="gptqkit-commit", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Until the last job is done (False: still running after `timeout` seconds); raises its
        error."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise e
        return True

    def abandon(self) -> None:
        """Stop waiting for a job that wait(timeout) left running (it goes on, unjoined; later
        waits return at once)."""
        self._thread = None
