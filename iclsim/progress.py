"""Progress of a long sweep from the Python API: ``fit_sweep(..., progress=f)`` and
``evaluate_sweep(..., progress=f)`` call f(Progress(done, total, elapsed, remaining)) as points finish,
k of N, with the seconds elapsed and an estimate of the seconds left; ``printer()`` is a ready-made f.

Training reports from inside the compiled step loop: every ``steps // REPORTS`` steps a
``jax.debug.callback`` of the step index alone (not batched, so one call per device however many points
are vmapped; a ``lax.cond`` on the step index, so it runs only at those steps) tells the host how far the
running program is; its points count as done in proportion. The callback reads nothing the loop computes
and writes nothing back, so the numbers are those of the silent program. Evaluation reports after each
chunk of points (scored in up to ``REPORTS`` chunks: a point's score does not depend on the layout).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Callable, NamedTuple

__all__ = ["Progress", "printer", "REPORTS"]

REPORTS = 20  # reports per training program (every steps // REPORTS steps) and most chunks of an evaluation


class Progress(NamedTuple):
    """done: points finished, k of ``total`` (fractional while a training program runs: its points times the
    fraction of its steps done); elapsed: seconds since the sweep started; remaining: the estimate
    elapsed (total - done) / done of the seconds left (None before anything is done)."""

    done: float
    total: int
    elapsed: float
    remaining: float | None


def printer(label: str = "sweep", file=None) -> Callable[[Progress], None]:
    """A progress function that prints one line per report, 'LABEL: K of N points, E s elapsed, about R s
    left', to ``file`` (default sys.stderr)."""

    def report(p: Progress) -> None:
        left = "" if p.remaining is None else f", about {p.remaining:.0f} s left"
        print(f"{label}: {p.done:.1f} of {p.total} points, {p.elapsed:.0f} s elapsed{left}",
              file=sys.stderr if file is None else file, flush=True)

    return report


class Tracker:
    """The host side of one sweep's progress: chunks of points run one after another (``chunk``), and within
    a training chunk the step callbacks move its fraction (``steps``; from any device's thread, deduplicated:
    only an increase is reported)."""

    def __init__(self, report: Callable[[Progress], None], total: int):
        if not callable(report):
            raise TypeError(f"progress must be None or a function Progress -> None, got {type(report).__name__}")
        self.report, self.total = report, int(total)
        self.start, self.base, self.points, self.fraction = time.perf_counter(), 0, 0, 0.0
        self.lock, self.last = threading.Lock(), -1.0
        self._emit(0.0)

    def _emit(self, done: float) -> None:
        # under the lock, so reports from several devices' threads reach ``report`` in order; only an increase
        # is reported (a chunk's last step callback and its end say the same)
        with self.lock:
            if done <= self.last:
                return
            self.last = done
            elapsed = time.perf_counter() - self.start
            remaining = elapsed * (self.total - done) / done if done > 0 else None
            self.report(Progress(float(done), self.total, elapsed, remaining))

    @contextlib.contextmanager
    def chunk(self, points: int):
        """Run ``points`` points: the step callbacks of programs run inside report through this tracker."""
        global _ACTIVE
        with self.lock:
            self.points, self.fraction, _ACTIVE = int(points), 0.0, self
        try:
            yield self
        finally:
            with self.lock:
                _ACTIVE = None
                self.base += self.points
                self.points = 0
                done = self.base
            self._emit(done)

    def steps(self, done_steps: int, total_steps: int) -> None:
        fraction = min(1.0, done_steps / total_steps)
        with self.lock:
            if fraction <= self.fraction:
                return
            self.fraction = fraction
            done = self.base + self.points * fraction
        self._emit(done)

    def finish(self) -> None:
        """The last report: every point done (loaded from a cache or computed)."""
        if self.base < self.total:
            self.base = self.total
            self._emit(self.total)


_ACTIVE: Tracker | None = None  # the tracker of the chunk running now (compiled programs call ``step_done``)


def step_done(done_steps, total_steps) -> None:
    """The step callback of a training program (``jax.debug.callback``): a no-op when no sweep with a progress
    function is running."""
    tracker = _ACTIVE
    if tracker is not None:
        tracker.steps(int(done_steps), int(total_steps))
