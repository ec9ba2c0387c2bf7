"""Running a kernel over its chunk table on several threads without ever waiting for a thread
that has not started.

Numba's parallel loops split the work among a team of threads up front and end with a
barrier: when another process holds a core, the calling thread finishes its share and then
waits for a worker the OS has not scheduled yet, a whole scheduler quantum or more (the
collapse measured by ``tools/busy_machine.py``; docs/backends.md has the numbers). So
:func:`run` cuts the chunk table into batches of about :data:`BATCH_ELEMENTS` elements and
lets the calling thread and helper threads *claim* batches one at a time. A helper that has
not started by the time the calling thread has claimed everything finds nothing left, and the
calling thread waits only for batches that a running helper has claimed. Every kernel call
runs on one Numba thread (``numba.set_num_threads(1)`` in each thread: no barrier with
anyone).

The kernels are given a slice of the chunk table. The step kernels are serial compiled
functions (``nogil``; a serial kernel compiles in a fraction of a parallel one's time and
never enters Numba's threading layer); a kernel with a parallel loop (the traffic probes)
runs on one Numba thread per call. Elements do not depend on which thread updates them, and
reductions are combined batch by batch in table order, so results do not depend on the
number of threads. Helpers are
Python threads started on first use, one per extra thread of ``numba.get_num_threads()``;
they sleep on a queue in between. Under Numba's ``workqueue`` threading layer, which does not
allow launches of parallel kernels from two threads at once, :func:`run` runs such a
kernel's batches one after another on Numba's own threads instead.
"""

from __future__ import annotations

import functools
import itertools
import os
import queue
import threading
import weakref

import numba
import numpy as np

from .util import CHUNK, chunk_table

#: Elements per claim (whole rows of the chunk table): about half a millisecond of a step
#: on one core, far above the cost of a call. A table of fewer elements is one call.
BATCH_ELEMENTS = 1 << 19

_BOUNDS: dict = {}  # id(table) -> (weak reference to the table, its batch boundaries)

_helpers: list[threading.Thread] = []
_jobs: queue.SimpleQueue = queue.SimpleQueue()
_start_lock = threading.Lock()


def _forget_helpers() -> None:
    """In a forked child: the parent's helper threads do not exist here."""
    global _jobs, _start_lock
    _helpers.clear()
    _jobs, _start_lock = queue.SimpleQueue(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helpers)


def _helper_loop(jobs: queue.SimpleQueue) -> None:
    numba.set_num_threads(1)
    while True:
        jobs.get()()


def _layer_allows_helpers() -> bool:
    """Whether concurrent launches from several threads are safe (not ``workqueue``)."""
    try:
        return numba.threading_layer() != "workqueue"
    except ValueError:  # no parallel region has run yet: the layer is not chosen
        return False


def _is_serial(kernel) -> bool:
    """A kernel without a parallel loop runs on its caller's thread alone: it never enters
    Numba's threading layer, so helpers may call it under any layer."""
    return not getattr(kernel, "targetoptions", {}).get("parallel", False)


def _ensure_helpers(count: int) -> int:
    """Start helpers up to ``count``; how many there are."""
    if len(_helpers) < count:
        with _start_lock:
            while len(_helpers) < count:
                thread = threading.Thread(
                    target=_helper_loop, args=(_jobs,), name="adamnp-helper", daemon=True
                )
                thread.start()
                _helpers.append(thread)
    return len(_helpers)


def batch_bounds(table) -> np.ndarray:
    """First rows of the batches of ``table`` (rows ``(leaf, lo, hi)``), then its length:
    a batch ends with the row that reaches the next multiple of :data:`BATCH_ELEMENTS`
    elements. Depends on the table only (cached per table).

    Examples
    --------
    >>> table = np.array([[0, 0, 400_000], [0, 400_000, 800_000], [1, 0, 300_000]])
    >>> batch_bounds(table).tolist()
    [0, 2, 3]
    """
    cached = _BOUNDS.get(id(table))
    if cached is not None and cached[0]() is table:
        return cached[1]
    sizes = table[:, 2] - table[:, 1]
    ends = np.cumsum(sizes)
    total = int(ends[-1]) if len(ends) else 0
    # a batch ends with the row that reaches the next multiple of BATCH_ELEMENTS
    starts = np.searchsorted(ends, np.arange(BATCH_ELEMENTS, total, BATCH_ELEMENTS)) + 1
    bounds = np.unique(np.concatenate(([0], np.minimum(starts, len(table)), [len(table)])))
    bounds = bounds.astype(np.int64)
    if len(_BOUNDS) > 256:  # tables are cached by their owners; this only follows them
        _BOUNDS.clear()
    _BOUNDS[id(table)] = (weakref.ref(table), bounds)
    return bounds


class _Job:
    """One :func:`run` call: the batches, who claims the next one, and what came back."""

    def __init__(self, kernel, table, args, bounds):
        self.kernel, self.table, self.args, self.bounds = kernel, table, args, bounds
        batches = len(bounds) - 1
        self.results = [None] * batches
        self.batches = batches
        self.claim = itertools.count()  # next() is atomic under the GIL
        self.done = 0
        self.error = None
        self.finished = threading.Condition()

    def __call__(self) -> None:
        """Claim and run batches until none is left."""
        while True:
            b = next(self.claim)
            if b >= self.batches:
                return
            try:
                rows = self.table[self.bounds[b] : self.bounds[b + 1]]
                self.results[b] = self.kernel(rows, *self.args)
            except BaseException as exc:  # reported by the calling thread
                self.error = exc
            with self.finished:
                self.done += 1
                self.finished.notify()

    def wait(self) -> list:
        with self.finished:
            while self.done < self.batches:
                self.finished.wait()
        if self.error is not None:
            raise self.error
        return self.results


def run(kernel, threads: int, table, *args) -> list:
    """``kernel(rows, *args)`` for each batch of ``table``'s rows, on up to ``threads``
    threads (the caller and helpers); the results in batch order."""
    bounds = batch_bounds(table)
    batches = len(bounds) - 1
    own = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        if batches <= 1:
            return [kernel(table, *args)]
        job = _Job(kernel, table, args, bounds)
        helpers_ok = _is_serial(kernel) or _layer_allows_helpers()
        if threads <= 1 or not helpers_ok:  # batch after batch on this thread,
            numba.set_num_threads(min(own, threads))  # each on Numba's own threads
            job()
            return job.wait()
        for _ in range(min(threads - 1, batches - 1, _ensure_helpers(threads - 1))):
            _jobs.put(job)
        job()
        return job.wait()
    finally:
        numba.set_num_threads(own)


def launch_traffic(kernel, *arrays) -> None:
    """Run a traffic kernel ``kernel(table, *arrays)`` over the chunks of its flat arrays as
    the step kernels run (:func:`run` on all of Numba's threads), so that a step and its
    traffic kernel are timed under the same scheduling."""
    run(kernel, numba.get_num_threads(), _flat_table(arrays[0].size), *arrays)


@functools.lru_cache(maxsize=16)
def _flat_table(n: int) -> np.ndarray:
    """The chunk table of one flat array of ``n`` elements, kept (so are its batch bounds)."""
    return chunk_table(np.array([n]), CHUNK)
