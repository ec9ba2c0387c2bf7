"""Numba CPU kernels for full-precision moments: the fused multi-tensor step, a traffic probe.

One call of :func:`step_fp32` updates every leaf of a :class:`~adamnp._state.LeafGroup`:
``prange`` runs over a table of chunks ``(leaf, start, stop)``; each chunk is one pass over its
elements reading ``p, g, m, v`` (and ``vmax``) and writing ``p, m, v`` (and ``vmax``), with
:func:`~adamnp.backends.math.adam_elem` inlined into a SIMD loop. Flags are runtime booleans
(one compiled variant per dtype; LLVM keeps the loop-invariant branches out of the arithmetic;
docs/backends.md has the measurement); only amsgrad selects between two loops, because it
adds a stream of memory: ``vmax`` is None without it, and the kernels' branch pruning
(:class:`.util._PruneOnArgumentTypes`) compiles the loop ``vmax`` selects and not the other
(:func:`_update`). ``_update`` is inlined by Numba rather than compiled separately, which
keeps a single copy of each loop and cuts the cold compile time.
"""

from __future__ import annotations

import numba
import numpy as np

from .finite import is_nonfinite
from .schedule import launch_traffic
from .util import as_pointer, elem, jit


@jit(inline="always")
def _update(p, g, m, v, vmax, a, b, k, decoupled, l2, maximize):
    """One fused pass over the chunk ``p``, ``g`` and rows ``a:b`` of the moments: the
    operations of ``numpy.update_chunk`` per element. ``vmax`` is None without amsgrad; a
    kernel compiles only the loop its ``vmax`` selects (the branch on it is decided before
    typing)."""
    m, v = m[a:b], v[a:b]
    if vmax is None:
        for i in range(p.size):
            p[i], m[i], v[i], _ = elem(
                p[i], g[i], m[i], v[i], m[i], k, decoupled, l2, False, maximize
            )
    else:
        x = vmax[a:b]
        for i in range(p.size):
            p[i], m[i], v[i], x[i] = elem(
                p[i], g[i], m[i], v[i], x[i], k, decoupled, l2, True, maximize
            )


#: ``step_fp32``'s ``check``: none, a check pass then the update (one call: only for a table
#: run as one batch), the check pass alone.
NO_CHECK, CHECK_THEN_UPDATE, CHECK_ONLY = 0, 1, 2


@jit()
def step_fp32(table, leaf_ids, offsets, p_addr, g_addr, m, v, vmax, k, flags, check):
    """Update all chunks of ``table`` in place; -1, or with ``check`` the tree index of the
    first leaf whose gradient is non-finite (:func:`.reduce.first_nonfinite`'s test), with
    nothing written. ``check``: :data:`NO_CHECK`, :data:`CHECK_THEN_UPDATE` or
    :data:`CHECK_ONLY` (the check pass alone: -1 or the bad leaf, nothing written).

    ``p_addr``/``g_addr`` hold the data addresses of all leaves of the tree, ``leaf_ids`` maps
    a group's leaf to its tree index, ``offsets`` locate it in the arenas ``m``, ``v`` and
    ``vmax`` (None unless amsgrad: :func:`_update`); ``k`` are the
    :class:`~adamnp.backends.math.KernelScalars` and ``flags = (decoupled_decay, l2_decay,
    amsgrad, maximize)``. The check is a pass of its own
    over the gradients before the update pass, in the same call.
    """
    decoupled, l2, _, maximize = flags  # amsgrad: vmax is not None
    size = m.itemsize
    if check:
        for c in range(table.shape[0]):  # the first bad chunk in table order: its leaf
            j, lo, hi = table[c, 0], table[c, 1], table[c, 2]
            g = numba.carray(as_pointer(g_addr[leaf_ids[j]] + lo * size, m), hi - lo)
            if is_nonfinite(g):
                return leaf_ids[j]
        if check == CHECK_ONLY:
            return -1
    for c in range(table.shape[0]):
        j, lo, hi = table[c, 0], table[c, 1], table[c, 2]
        leaf = leaf_ids[j]
        a, b = offsets[j] + lo, offsets[j] + hi
        p = numba.carray(as_pointer(p_addr[leaf] + lo * size, m), hi - lo)
        g = numba.carray(as_pointer(g_addr[leaf] + lo * size, m), hi - lo)
        _update(p, g, m, v, vmax, a, b, k, decoupled, l2, maximize)
    return -1


@jit()
def _traffic_chunk(p, g, m, v):
    for i in range(p.size):
        x = g[i]
        m[i] = m[i] + x
        v[i] = v[i] + x
        p[i] = p[i] + x


@jit()
def _traffic(table, p, g, m, v):
    for c in range(table.shape[0]):
        lo, hi = table[c, 1], table[c, 2]
        _traffic_chunk(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi])


_UNSIGNED = {2: np.uint16, 4: np.uint32, 8: np.uint64}  # read_traffic's view of g by size


@jit(inline="always")
def _or_all(bits):
    acc = bits.dtype.type(0)
    for i in range(bits.size):
        acc = bits.dtype.type(acc | bits[i])
    return acc


@jit()
def _read_traffic(table, bits):
    """The bitwise or of every element of the unsigned-integer array ``bits``: a read pass
    with trivial arithmetic, the traffic of a gradient check."""
    acc = bits.dtype.type(0)
    for c in range(table.shape[0]):
        acc = bits.dtype.type(acc | _or_all(bits[table[c, 1] : table[c, 2]]))
    return acc


def read_traffic(g: np.ndarray) -> None:
    """Read every byte of ``g`` once with trivial arithmetic, chunked and scheduled as a
    step's gradient check (:func:`step_fp32`'s check pass) runs: the traffic that
    ``nonfinite="raise"`` adds to a step, which checks every gradient before it writes
    anything (a refused step leaves params and state unchanged).

    Examples
    --------
    >>> read_traffic(np.ones(5, np.float32))
    """
    flat = g.reshape(-1)
    launch_traffic(_read_traffic, flat.view(_UNSIGNED[flat.itemsize]))


def traffic_kernel(
    p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, *, check_pass: bool = False
) -> None:
    """Move the bytes of a step without its arithmetic: ``m += g; v += g; p += g``.

    Reads ``p, g, m, v`` and writes ``p, m, v`` (28 bytes per float32 element) with the same
    parallel chunking as :func:`step_fp32`; the step time divided by this kernel's time on the
    same arrays says how close the step runs to the memory bandwidth. With ``check_pass``, a
    pass of :func:`read_traffic` over ``g`` first (32 bytes per element): the bytes a step
    with ``nonfinite="raise"`` must move, since it reads every gradient before it writes.

    Examples
    --------
    >>> p, g, m, v = (np.ones(5, np.float32) for _ in range(4))
    >>> traffic_kernel(p, g, m, v)
    >>> p
    array([2., 2., 2., 2., 2.], dtype=float32)
    >>> traffic_kernel(p, g, m, v, check_pass=True)
    >>> p
    array([3., 3., 3., 3., 3.], dtype=float32)
    """
    if check_pass:
        read_traffic(g)
    launch_traffic(_traffic, p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1))
