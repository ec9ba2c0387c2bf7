"""Checking many host leaves in one compiled call, from the fields of NumPy's array struct.

:func:`adamnp.step` checks every leaf before it writes anything: dtype, shape, C-contiguity,
writability of params, and that no two leaves, and no leaf and the state's buffers, share
memory. Through Python attributes that costs about half a microsecond per leaf (``a.flags``
builds an object each time), more than the update of a small leaf. :func:`host_leaves_ok`
reads the same facts from each array's ``PyArrayObject`` (NumPy's public C struct: data
pointer, number of dimensions, dimensions, descriptor, flags) in one Numba call. The field
offsets are found once, at import, and verified on probe arrays of several shapes, dtypes and
flags; where they do not verify (another NumPy layout, a big-endian machine) the function
answers None and the caller checks in Python. Only objects whose type is exactly
``np.ndarray`` are read.
"""

from __future__ import annotations

import ctypes

import numpy as np

from .util import jit, load_int64

_C_CONTIGUOUS, _WRITEABLE = 0x1, 0x400  # NPY_ARRAY_C_CONTIGUOUS, NPY_ARRAY_WRITEABLE
_LOW32 = np.int64(0xFFFFFFFF)


def _read(address: int, ctype) -> int:
    return ctype.from_address(address).value


def _field_offsets() -> np.ndarray | None:
    """``[data, nd, dimensions, descr, flags]`` offsets in ``PyArrayObject``, if verified."""
    if np.little_endian is False or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    head = object.__basicsize__
    offsets = np.array([head, head + 8, head + 16, head + 40, head + 48], np.int64)
    data, nd, dims, descr, flags = (int(o) for o in offsets)
    base = np.arange(24.0).reshape(2, 3, 4)
    read_only = np.zeros(5, np.float32)
    read_only.flags.writeable = False
    probes = [
        np.zeros(3, np.float32),
        base,
        base[:, 1:],
        base.T,
        read_only,
        np.zeros((), np.float16),
    ]
    for a in probes:
        i = id(a)
        if _read(i + data, ctypes.c_ssize_t) != a.__array_interface__["data"][0]:
            return None
        if _read(i + nd, ctypes.c_int) != a.ndim or _read(i + descr, ctypes.c_ssize_t) != id(
            a.dtype
        ):
            return None
        shape = tuple(
            _read(_read(i + dims, ctypes.c_ssize_t) + 8 * d, ctypes.c_ssize_t)
            for d in range(a.ndim)
        )
        if shape != a.shape:
            return None
        bits = _read(i + flags, ctypes.c_int)
        if (
            bool(bits & _C_CONTIGUOUS) != a.flags.c_contiguous
            or bool(bits & _WRITEABLE) != a.flags.writeable
        ):
            return None
    return offsets


#: The verified field offsets, or None (then :func:`host_leaves_ok` answers None).
FIELDS = _field_offsets()


@jit(inline="always")
def _sort_spans(lo, hi):
    """Sort the spans ``[lo[i], hi[i])`` by ``lo`` in place: Shell sort with gaps growing by
    about 2.25, as Tokuda's. Short code: it compiles faster than the heapsort of indices it
    replaced and runs faster on 200 spans (docs/backends.md, First use); compiling Numba's
    ``np.argsort`` cost about 2 s of a cold first step."""
    n = lo.size
    gaps = np.empty(64, np.int64)
    count = 0
    gap = 1
    while gap < n:
        gaps[count] = gap
        count += 1
        gap = (9 * gap + 4) // 4 + 1
    for t in range(count - 1, -1, -1):
        gap = gaps[t]
        for i in range(gap, n):
            a, b = lo[i], hi[i]
            k = i
            while k >= gap and lo[k - gap] > a:
                lo[k], hi[k] = lo[k - gap], hi[k - gap]
                k -= gap
            lo[k], hi[k] = a, b


@jit()
def _scan(ids, n_params, nd, dims, dim_start, descr, itemsize, alt_descr, alt_itemsize,
          arena_lo, arena_hi, fields):  # fmt: skip
    """Whether the arrays at object addresses ``ids`` (params, then grads, leaf ``j`` at
    ``j`` and ``n_params + j``) have the expected dims and descriptor (grads: or the
    alternative one), are C-contiguous, params writable, and share no memory with each
    other or with the arenas ``[arena_lo, arena_hi)``."""
    total = ids.size
    lo = np.empty(total + arena_lo.size, np.int64)
    hi = np.empty(total + arena_lo.size, np.int64)
    for i in range(total):
        obj = ids[i]
        param = i < n_params
        j = i if param else i - n_params
        flags = load_int64(obj + fields[4]) & _LOW32
        if flags & _C_CONTIGUOUS == 0 or (param and flags & _WRITEABLE == 0):
            return False
        d = load_int64(obj + fields[3])
        if d == descr[j]:
            size = itemsize[j]
        elif not param and d == alt_descr[j]:
            size = alt_itemsize[j]
        else:
            return False
        if load_int64(obj + fields[1]) & _LOW32 != nd[j]:
            return False
        shape = load_int64(obj + fields[2])
        for k in range(nd[j]):
            extent = load_int64(shape + 8 * k)
            if extent != dims[dim_start[j] + k]:
                return False
            size *= extent
        lo[i] = load_int64(obj + fields[0])
        hi[i] = lo[i] + size
    for a in range(arena_lo.size):
        lo[total + a], hi[total + a] = arena_lo[a], arena_hi[a]
    _sort_spans(lo, hi)
    reach = np.int64(0)  # the end of the memory seen so far, in address order
    for i in range(lo.size):
        if hi[i] > lo[i]:  # an empty leaf overlaps nothing
            if lo[i] < reach:
                return False
            reach = max(reach, hi[i])
    return True


class LeafSpec:
    """What every step expects of a state's leaves, as arrays for :func:`_scan` (made once
    per state: dims, descriptor addresses and item sizes, with float32 as the gradients'
    alternative for float16/bfloat16 leaves)."""

    def __init__(self, shapes, dtypes, alt_dtypes):
        self.nd = np.array([len(s) for s in shapes], np.int64)
        self.dim_start = np.zeros(len(shapes), np.int64)
        self.dim_start[1:] = np.cumsum(self.nd)[:-1]
        self.dims = np.array([d for s in shapes for d in s] or [0], np.int64)
        # dtype objects live as long as the spec (the descriptor addresses stay valid)
        self.dtypes, self.alt_dtypes = (
            [np.dtype(d) for d in dtypes],
            [np.dtype(d) for d in alt_dtypes],
        )
        self.descr = np.array([id(d) for d in self.dtypes], np.int64)
        self.itemsize = np.array([d.itemsize for d in self.dtypes], np.int64)
        self.alt_descr = np.array([id(d) for d in self.alt_dtypes], np.int64)
        self.alt_itemsize = np.array([d.itemsize for d in self.alt_dtypes], np.int64)


def host_leaves_ok(p_leaves, g_leaves, spec: LeafSpec, arena_lo, arena_hi) -> bool | None:
    """Whether all leaves pass the checks above (all ``np.ndarray`` exactly), or None when
    this cannot be read here (the caller checks in Python). False does not say which check
    failed: the caller's full validation names it."""
    if FIELDS is None:
        return None
    leaves = p_leaves + g_leaves
    if {*map(type, leaves)} != {np.ndarray}:
        return None
    ids = np.fromiter(map(id, leaves), np.int64, len(leaves))
    shapes = (spec.nd, spec.dims, spec.dim_start)
    dtypes = (spec.descr, spec.itemsize, spec.alt_descr, spec.alt_itemsize)
    return bool(_scan(ids, len(p_leaves), *shapes, *dtypes, arena_lo, arena_hi, FIELDS))
