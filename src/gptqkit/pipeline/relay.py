"""Run several calibration chunks through one block as coroutines, one computing at a time.

Each chunk's block forward runs in its own thread, but a baton lets exactly one of them compute
at any moment, always in chunk order: the result is deterministic and never oversubscribes the
cores (torch's intra-op threads stay the only parallelism). A chunk that reaches a stop point
(a linear whose Hessian still needs the other chunks) calls stop(): the baton goes to the next
chunk; the last chunk to arrive runs on_round (solve that linear), and the baton goes back to
chunk 0, so every chunk continues its suspended forward. A block costs one forward of compute
per chunk, while only the suspended states plus one chunk's transients are alive.

If the chunks do not stop at the same point (routed experts: a chunk may skip a linear), the
last chunk raises Undecided and the caller falls back to the replay.

Ctrl-C (and any signal turned into an exception) reaches the main thread only: it waits in
short slices, and on an exception wakes every worker with _Abort and joins them before
re-raising. An exception in a worker aborts the others and is re-raised in the main thread.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

_DONE = object()   # the stop of a chunk whose forward has ended


class Undecided(Exception):
    """The chunks stopped at different points; the caller must use another strategy."""


class _Abort(BaseException):
    """Raised in a waiting worker when the run is aborted (BaseException: model code that
    catches Exception must not swallow it)."""


class Relay:
    def __init__(self, n: int, on_round: Callable[[Any], None]):
        self.n, self.on_round = n, on_round
        self.cond = threading.Condition()
        self.turn = 0                          # the chunk that may compute; n: all finished
        self.stops: list[Any] = [None] * n     # where each chunk waits in this round
        self.failure: BaseException | None = None
        self.aborted = False

    # ------------------------------------------------------------------ in a worker
    def stop(self, c: int, key: Any) -> None:
        """Chunk c reached stop point `key`: hand the baton on, return when it is c's again."""
        self.stops[c] = key
        if c == self.n - 1:
            self._check_round(key)
            self.on_round(key)   # only this thread computes now: no lock needed
            self.stops = [None] * self.n
        self._hand_on((c + 1) % self.n)
        self._wait(c)

    def finish(self, c: int) -> None:
        """Chunk c's forward ended."""
        self.stops[c] = _DONE
        if c == self.n - 1:
            self._check_round(_DONE)
        self._hand_on(c + 1)

    def _check_round(self, key: Any) -> None:
        if any(s is not key for s in self.stops):
            raise Undecided("calibration chunks stopped at different linears")

    def _hand_on(self, turn: int) -> None:
        with self.cond:
            self.turn = turn
            self.cond.notify_all()

    def _wait(self, c: int) -> None:
        with self.cond:
            while self.turn != c and not self.aborted:
                self.cond.wait()
            if self.aborted:
                raise _Abort

    def _worker(self, c: int, work: Callable[[int], None]) -> None:
        try:
            self._wait(c)
            work(c)
            self.finish(c)
        except _Abort:
            pass
        except BaseException as e:  # handed to the main thread, which re-raises it
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        with self.cond:
            if self.failure is None:
                self.failure = e
            self.aborted = True
            self.cond.notify_all()

    # ------------------------------------------------------------------ in the main thread
    def run(self, work: Callable[[int], None]) -> None:
        """work(c) runs chunk c's forward (calling stop() from inside); returns when every
        chunk finished, raises the first worker error (Undecided included)."""
        threads = [threading.Thread(target=self._worker, args=(c, work), daemon=True,
                                    name=f"gptqkit-chunk-{c}") for c in range(self.n)]
        for t in threads:
            t.start()
        try:
            with self.cond:
                while self.turn != self.n and self.failure is None:
                    self.cond.wait(0.2)   # short slices: Ctrl-C is handled between them
        except BaseException as e:
            self._fail(e)
            raise
        finally:
            for t in threads:   # a computing worker stops at its next stop point
                t.join()
        if self.failure is not None:
            raise self.failure
