"""The few collectives a sharded state needs, on an mpi4py communicator or on threads.

Only buffer messages (NumPy arrays, MPI's own datatypes): nothing is pickled. :class:`MPIComm`
wraps an ``mpi4py`` communicator; :class:`ThreadComm` runs the same collectives between
threads of one process (:func:`simulate`), which is how the tests and a laptop run several
ranks without MPI. Errors are agreed on collectively (:func:`agree`): when one rank finds a
problem every rank raises, and none is left waiting in a collective.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from .._checkpoint import CheckpointError

_MESSAGE_BYTES = 2048  # an error message travels as this many UTF-8 bytes at most
_ERRORS = (CheckpointError, ValueError, TypeError, RuntimeError, OSError)  # most specific first


class MPIComm:
    """The collectives on an ``mpi4py`` communicator (``MPI.COMM_WORLD`` or a split of it)."""

    def __init__(self, comm):
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def reduce_scatter(self, send: np.ndarray, recv: np.ndarray) -> None:
        """``recv`` = the sum over ranks of this rank's block of ``send`` (blocks of
        ``recv.size`` elements, in rank order)."""
        self.comm.Reduce_scatter_block(send, recv, op=self._mpi.SUM)

    def allgather(self, buf: np.ndarray) -> None:
        """Every rank's block of ``buf`` (``buf.size // size`` elements, its own already in
        place) into every rank's ``buf``."""
        self.comm.Allgather(self._mpi.IN_PLACE, buf)

    def allreduce(self, buf: np.ndarray, op: str) -> None:
        """``buf`` = its elementwise ``"sum"``, ``"min"`` or ``"max"`` over ranks, in place."""
        ops = {"sum": self._mpi.SUM, "min": self._mpi.MIN, "max": self._mpi.MAX}
        self.comm.Allreduce(self._mpi.IN_PLACE, buf, op=ops[op])

    def bcast(self, buf: np.ndarray, root: int) -> None:
        """Root's ``buf`` into every rank's ``buf``."""
        self.comm.Bcast(buf, root=root)

    def gatherv(self, send: np.ndarray, recv, counts, root: int) -> None:
        """Every rank's ``send`` (``counts[r]`` elements) into root's ``recv``, in rank
        order; ``recv`` is ignored on other ranks."""
        if self.rank == root:
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
            self.comm.Gatherv(send, [recv, (list(counts), displs)], root=root)
        else:
            self.comm.Gatherv(send, None, root=root)

    def barrier(self) -> None:
        self.comm.Barrier()

    def ranks_on_this_machine(self) -> int:
        """How many ranks of the communicator share this rank's machine (its shared-memory
        node)."""
        node = self.comm.Split_type(self._mpi.COMM_TYPE_SHARED)
        try:
            return node.Get_size()
        finally:
            node.Free()


class _Hub:
    """What the threads of :func:`simulate` share."""

    def __init__(self, n: int, timeout: float):
        self.barrier = threading.Barrier(n, timeout=timeout)
        self.slots: list = [None] * n


class ThreadComm:
    """:class:`MPIComm`'s collectives between the threads of :func:`simulate`.

    Reductions add in rank order (MPI's order is its own; with exactly representable sums
    both give the same result).
    """

    def __init__(self, hub: _Hub, rank: int, size: int):
        self._hub = hub
        self.rank = rank
        self.size = size

    def _exchange(self, item) -> list:
        hub = self._hub
        hub.slots[self.rank] = item
        hub.barrier.wait()
        items = list(hub.slots)
        return items

    def _done(self) -> None:
        self._hub.barrier.wait()  # nobody reads a buffer that its owner changes after this

    def reduce_scatter(self, send, recv) -> None:
        items = self._exchange(send)
        lo = self.rank * recv.size
        recv[:] = items[0][lo : lo + recv.size]
        for other in items[1:]:
            recv += other[lo : lo + recv.size]
        self._done()

    def allgather(self, buf) -> None:
        items = self._exchange(buf)
        n = buf.size // self.size
        for r, other in enumerate(items):
            if r != self.rank:
                buf[r * n : (r + 1) * n] = other[r * n : (r + 1) * n]
        self._done()

    def allreduce(self, buf, op: str) -> None:
        items = self._exchange(buf.copy())
        fold = {"sum": np.add, "min": np.minimum, "max": np.maximum}[op]
        out = items[0].copy()
        for other in items[1:]:
            fold(out, other, out=out)
        self._done()
        buf[:] = out

    def bcast(self, buf, root: int) -> None:
        items = self._exchange(buf)
        if self.rank != root:
            buf[:] = items[root]
        self._done()

    def gatherv(self, send, recv, counts, root: int) -> None:
        items = self._exchange(send)
        if self.rank == root:
            at = 0
            for r, other in enumerate(items):
                recv[at : at + counts[r]] = other[: counts[r]]
                at += counts[r]
        self._done()

    def barrier(self) -> None:
        self._hub.barrier.wait()

    def ranks_on_this_machine(self) -> int:
        """Threads share the process's Numba threads; each sets its own: 1 here means
        "leave them as they are"."""
        return 1


def simulate(nranks: int, fn: Callable, *, timeout: float = 600.0) -> list:
    """Run ``fn(comm)`` on ``nranks`` threads, each with a :class:`ThreadComm` of its rank;
    return the results in rank order.

    The in-process way to run a sharded state without MPI (tests, a laptop). If any rank
    raises, the others are released from their collectives and the lowest rank's exception
    is raised here.

    Examples
    --------
    >>> import numpy as np
    >>> def rank_sum(comm):
    ...     buf = np.array([comm.rank + 1.0])
    ...     comm.allreduce(buf, "sum")
    ...     return float(buf[0])
    >>> simulate(3, rank_sum)
    [6.0, 6.0, 6.0]
    """
    if type(nranks) is not int or nranks < 1:
        raise ValueError(f"nranks must be a positive int, got {nranks!r}")
    hub = _Hub(nranks, timeout)
    results: list = [None] * nranks
    errors: list = [None] * nranks

    def run(rank):
        try:
            results[rank] = fn(ThreadComm(hub, rank, nranks))
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors[rank] = exc
            hub.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(nranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    raised = [e for e in errors if e is not None]
    real = [e for e in raised if not isinstance(e, threading.BrokenBarrierError)]
    if real or raised:
        raise (real or raised)[0]
    return results


def as_comm(comm):
    """An :class:`MPIComm` or :class:`ThreadComm` for ``comm``: None is ``MPI.COMM_WORLD``
    (mpi4py must be installed: ``pip install adamnp[mpi]``)."""
    if isinstance(comm, MPIComm | ThreadComm):
        return comm
    if comm is None:
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ImportError(
                "adamnp.distributed needs mpi4py for comm=None (MPI.COMM_WORLD): "
                "pip install mpi4py (and an MPI, e.g. pip install mpich); or pass a comm "
                "from adamnp.distributed.simulate"
            ) from exc
        return MPIComm(MPI.COMM_WORLD)
    if hasattr(comm, "Get_rank") and hasattr(comm, "Allreduce"):
        return MPIComm(comm)
    raise TypeError(
        f"comm must be an mpi4py communicator (e.g. MPI.COMM_WORLD), a comm from "
        f"adamnp.distributed.simulate, or None; got {type(comm).__name__}"
    )


def agree(comm, error: BaseException | None) -> None:
    """Raise on every rank if ``error`` is not None on any rank; return on all otherwise.

    The rank that found a problem raises its own exception; the others raise the same type
    with the lowest such rank's message, prefixed by its rank. One small allreduce when
    nothing is wrong.
    """
    if comm.size == 1:
        if error is not None:
            raise error
        return
    flag = np.array([comm.rank if error is not None else comm.size], np.int64)
    comm.allreduce(flag, "min")
    first = int(flag[0])
    if first == comm.size:
        return
    message = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
    if comm.rank == first:
        kind = next((i for i, t in enumerate(_ERRORS) if isinstance(error, t)), 3)
        text = str(error).encode("utf-8", "replace")[:_MESSAGE_BYTES]
        message[0] = kind
        message[1 : 1 + len(text)] = np.frombuffer(text, np.uint8)
    comm.bcast(message, first)
    if error is not None:
        raise error
    kind = _ERRORS[int(message[0])]
    text = message[1:].tobytes().rstrip(b"\0").decode("utf-8", "replace")
    raise kind(f"on rank {first}: {text}")
