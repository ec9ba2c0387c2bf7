"""Numba CPU reductions over all gradient leaves: the non-finite check and the square norm.

The non-finite check also rejects finite magnitudes at or above
:func:`adamnp.backends.math.grad_limit`, whose square could overflow ``v``.

Both run ``prange`` over the fixed chunk table of :func:`.util.chunk_table` and keep one
result per chunk, combined afterwards in chunk order, so the answer does not depend on the
number of threads. Leaves are passed as data addresses plus element sizes (2, 4 or 8 bytes),
so float32, float64 and half-precision leaves share one call; a 2-byte leaf also needs its
format (float16 or bfloat16, :mod:`adamnp.lowbit.half`), given per leaf. A half-precision
gradient counts as the float32 it is upcast to: non-finite when NaN or Inf (float16's largest
finite value is far below the limit) or, for bfloat16, of magnitude at or above ``2**63``
(``|bits| >= 0x5F00``, the top half of the float32 limit's bits).
"""

from __future__ import annotations

import numba
import numpy as np

from .finite import (
    ABS64,
    LIMIT64,
    LIMIT_BF16,
    LIMIT_F16,
    f32_bits_nonfinite,
    half_bits_nonfinite,
    max_abs_bits,
)
from .half import to_f32
from .util import CHUNK, as_pointer, jit


@jit()
def first_nonfinite(table, addr, itemsize, half, wide):
    """Index of the first leaf holding NaN, Inf or a magnitude at or above
    :func:`~adamnp.backends.math.grad_limit`: the integer max of its ``|x|`` bits reaches
    :func:`~adamnp.backends.math.grad_limit_bits` (one compare per chunk). ``half[j]`` is the
    format of leaf ``j`` if it has 2-byte elements (0 float16, 1 bfloat16), and ``half`` is
    None when no leaf has; ``wide`` is None when no leaf has 8-byte elements. Numba prunes
    the branches of a None argument before compiling: float32 gradients alone compile one
    loop."""
    for c in range(table.shape[0]):  # the first bad chunk in table order: its leaf
        j, lo, hi = table[c, 0], table[c, 1], table[c, 2]
        if half is not None and itemsize[j] == 2:
            limit = LIMIT_BF16 if half[j] == 1 else LIMIT_F16
            bad = half_bits_nonfinite(addr[j] + lo * 2, hi - lo, limit)
        elif wide is not None and itemsize[j] == 8:
            x64 = numba.carray(as_pointer(addr[j] + lo * 8, np.int64), hi - lo)
            bad = max_abs_bits(x64, ABS64) >= LIMIT64
        else:  # is_nonfinite's test, on the bits (one function less to compile)
            bad = f32_bits_nonfinite(addr[j] + lo * 4, hi - lo)
        if bad:
            return table[c, 0]
    return -1


@jit(inline="always")
def _sum_squares(x):
    """Sum of ``float64(x[i])**2`` in eight interleaved partial sums, in a fixed order.

    Eight independent sums hide the latency of the additions (docs/backends.md);
    LLVM does not vectorize them without reassociation, which would make the order depend on
    the vector width.
    """
    rows = x.size // 8
    y = x[: rows * 8].reshape((rows, 8))
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    for r in range(rows):
        s0 += np.float64(y[r, 0]) * np.float64(y[r, 0])
        s1 += np.float64(y[r, 1]) * np.float64(y[r, 1])
        s2 += np.float64(y[r, 2]) * np.float64(y[r, 2])
        s3 += np.float64(y[r, 3]) * np.float64(y[r, 3])
        s4 += np.float64(y[r, 4]) * np.float64(y[r, 4])
        s5 += np.float64(y[r, 5]) * np.float64(y[r, 5])
        s6 += np.float64(y[r, 6]) * np.float64(y[r, 6])
        s7 += np.float64(y[r, 7]) * np.float64(y[r, 7])
    for i in range(rows * 8, x.size):
        s0 += np.float64(x[i]) * np.float64(x[i])
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@jit(inline="always")
def _upcast(x16, fmt, out):
    """``out[:n]`` = the float32 values of the ``n`` half bits ``x16`` (format ``fmt``)."""
    for i in range(x16.size):
        out[i] = to_f32(x16[i], fmt)
    return out[: x16.size]


@jit()
def sum_squares(table, addr, itemsize, half, wide):
    """Sum of squares of all elements: float64 sums per chunk, added in chunk order.
    ``half`` and ``wide`` as :func:`first_nonfinite`'s: a None argument compiles no loop
    for its element size. A 2-byte chunk is upcast into a float32 scratch first, which
    gives the float32 loop the very values and order it would add."""
    total = 0.0
    scratch = np.empty(0 if half is None else CHUNK, np.float32)
    for c in range(table.shape[0]):
        j, lo, hi = table[c, 0], table[c, 1], table[c, 2]
        if half is not None and itemsize[j] == 2:
            x16 = numba.carray(as_pointer(addr[j] + lo * 2, np.uint16), hi - lo)
            total += _sum_squares(_upcast(x16, half[j], scratch))
        elif wide is not None and itemsize[j] == 8:
            total += _sum_squares(numba.carray(as_pointer(addr[j] + lo * 8, np.float64), hi - lo))
        else:
            total += _sum_squares(numba.carray(as_pointer(addr[j] + lo * 4, np.float32), hi - lo))
    return total
