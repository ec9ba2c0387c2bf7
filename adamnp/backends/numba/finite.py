"""The non-finite test of gradients, in integer arithmetic on their bits (compiled code).

A gradient element counts as non-finite when it is NaN, Inf or of magnitude at or above
:func:`adamnp.backends.math.grad_limit` (its square could overflow ``v``): the bits of
``|x|`` reach :func:`~adamnp.backends.math.grad_limit_bits`, which an integer max decides
(LLVM vectorizes it; a float max not). Used by :mod:`.reduce` (the check over all leaves) and
by the step kernels that check their own gradients before writing (:mod:`.fp32`,
:mod:`.small`).
"""

from __future__ import annotations

import numba
import numpy as np

from ..math import grad_limit_bits
from .util import as_pointer, jit

ABS32 = np.int32(0x7FFFFFFF)
ABS64 = np.int64(0x7FFFFFFFFFFFFFFF)
# The bits of grad_limit: |x| bits at or above them are NaN, Inf or |x| >= grad_limit.
# (Numba freezes these globals into the cached kernel: after changing grad_limit in
# backends/math.py, delete the *.nbi / *.nbc files.)
LIMIT32 = np.int32(grad_limit_bits(np.float32))
LIMIT64 = np.int64(grad_limit_bits(np.float64))
ABS16 = np.uint16(0x7FFF)
LIMIT_F16 = np.int32(0x7C00)  # float16 NaN and Inf
LIMIT_BF16 = np.int32(grad_limit_bits(np.float32) >> 16)  # exact: the limit is a power of 2


@jit(inline="always")
def max_abs_bits(bits, mask):
    """Largest ``bits[i] & mask``: an integer max, which LLVM vectorizes (a float max not)."""
    top = bits.dtype.type(0)
    for i in range(bits.size):
        top = max(top, bits.dtype.type(bits[i] & mask))  # stay in 32 bits for int32
    return top


@jit(inline="always")
def max_abs_half(bits):
    """Largest ``bits[i] & 0x7FFF`` of uint16 bits, as int32. The max stays in 16 bits, 32
    lanes per AVX-512 instruction (widened to 32 bits first, the loop took 15% longer on one
    core, near the read bandwidth)."""
    top = np.uint16(0)
    for i in range(bits.size):
        top = np.uint16(max(top, np.uint16(bits[i] & ABS16)))
    return np.int32(top)


@jit(inline="always")
def half_bits_nonfinite(address, n, limit):
    """Whether the ``n`` float16 or bfloat16 values at ``address`` hold NaN, Inf or (bfloat16)
    a magnitude at or above the gradient limit: ``limit`` is :data:`LIMIT_F16` or
    :data:`LIMIT_BF16` (a half gradient counts as the float32 it is upcast to)."""
    return max_abs_half(numba.carray(as_pointer(address, np.uint16), n)) >= limit


@jit(inline="always")
def f32_bits_nonfinite(address, n):
    """:func:`is_nonfinite` of the ``n`` float32 values at ``address``."""
    return max_abs_bits(numba.carray(as_pointer(address, np.int32), n), ABS32) >= LIMIT32


@jit(inline="always")
def is_nonfinite(g):
    """Whether the contiguous float32 or float64 array ``g`` holds NaN, Inf or a magnitude at
    or above the gradient limit (the test of :func:`.reduce.first_nonfinite`).

    Reads ``g``'s memory as integers through a pointer: an ``overload`` choosing
    ``g.view(np.int32)`` or ``g.view(np.int64)`` by dtype gave the same code but cost about
    a second of every cold compile. Both branches are typed; LLVM drops the other one.

    Examples
    --------
    >>> import numba
    >>> test = numba.njit(lambda g: is_nonfinite(g))
    >>> test(np.ones(3, np.float32)), test(np.float32([1, np.nan])), test(np.array([2.0**480]))
    (False, True, True)
    """
    if g.itemsize == 4:
        return f32_bits_nonfinite(g.ctypes.data, g.size)
    bits64 = numba.carray(as_pointer(g.ctypes.data, np.int64), g.size)
    return max_abs_bits(bits64, ABS64) >= LIMIT64
