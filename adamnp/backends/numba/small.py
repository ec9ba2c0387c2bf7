"""Numba CPU kernel for small steps: one leaf, checked and updated in one serial call.

A step of a few thousand elements costs far less than the calls around it: validating the
tree, the non-finite check as a kernel of its own, the chunk table, the data addresses, the
thread count, the scalars record. :func:`step_one` does all of a float32 or float64 leaf's
step in one call that takes the arrays themselves (Numba unboxes an array in a tenth of a
microsecond, a record of scalars in microseconds): the aliasing check between the leaf, its
gradient and its moments, the non-finite check, then the update, on the calling thread.
Nothing is written unless every check passes. The arithmetic is :func:`.fp32.step_fp32`'s
(:func:`~adamnp.backends.math.adam_elem`, scalars rounded from the same float64 values), so
the results are the same bits.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

from ..math import SMALL_NONFINITE, SMALL_SHARES_MEMORY, SMALL_UPDATED, KernelScalars
from .finite import LIMIT_BF16, LIMIT_F16, f32_bits_nonfinite, half_bits_nonfinite, is_nonfinite
from .fp32 import _update
from .half import format_tag, tag_format, update_half
from .util import jit


@jit(inline="always")
def _disjoint(a, b):
    """Whether the memory of arrays ``a`` and ``b`` does not overlap (empty arrays never do)."""
    if a.size == 0 or b.size == 0:
        return True
    a0, b0 = a.ctypes.data, b.ctypes.data
    return a0 + a.nbytes <= b0 or b0 + b.nbytes <= a0


@jit(inline="always")
def _shares_memory(p, g, m, v, vmax):
    """Whether two of the leaf ``p``, its gradient ``g`` and its moments overlap."""
    return not (
        _disjoint(p, g) and _disjoint(p, m) and _disjoint(p, v) and _disjoint(p, vmax)
        and _disjoint(g, m) and _disjoint(g, v) and _disjoint(g, vmax)
    )  # fmt: skip


def _in_dtype_of(like, x):
    """``x`` rounded to the dtype of array ``like`` (compiled code only)."""
    raise NotImplementedError


@overload(_in_dtype_of, inline="always")
def _in_dtype_of_impl(like, x):
    if like.dtype == types.float32:
        return lambda like, x: np.float32(x)
    return lambda like, x: np.float64(x)


@jit(inline="always")
def _scalars(like, grad_scale, decay, weight_decay, lerp_weight, beta2, one_minus_beta2,
             neg_step_size, bc2_sqrt, eps):  # fmt: skip
    """:func:`~adamnp.backends.math.kernel_scalars` of the float64 values, in ``like``'s
    dtype (the same roundings: float64 to float32 or float64, then ``1 - w``)."""
    w = _in_dtype_of(like, lerp_weight)
    return KernelScalars(
        _in_dtype_of(like, grad_scale),
        _in_dtype_of(like, decay),
        _in_dtype_of(like, weight_decay),
        w,
        _in_dtype_of(like, 1.0) - w,
        _in_dtype_of(like, beta2),
        _in_dtype_of(like, one_minus_beta2),
        _in_dtype_of(like, neg_step_size),
        _in_dtype_of(like, bc2_sqrt),
        _in_dtype_of(like, eps),
        abs(np.float64(w)) < 0.5,
    )


@jit()
def step_one(p, g, m, v, vmax, host, decoupled, l2, maximize, check):
    """One step of one leaf in place: ``SMALL_UPDATED``, or ``SMALL_NONFINITE`` or
    ``SMALL_SHARES_MEMORY`` with nothing written (:mod:`adamnp.backends.math`).

    ``p`` and ``g`` are the leaf and its gradient (1-D, C-contiguous, one dtype, float32
    or float64), ``m``, ``v`` and ``vmax`` its moments (``vmax`` None without amsgrad: one
    update loop is compiled, not two, :func:`.fp32._update`), ``host`` the first nine
    :class:`~adamnp.backends.math.StepScalars` values (a tuple), then the branch flags other
    than amsgrad (which ``vmax`` says) and ``check`` (reject non-finite gradients).
    """
    if _shares_memory(p, g, m, v, m[:0] if vmax is None else vmax):
        return SMALL_SHARES_MEMORY
    if check and is_nonfinite(g):
        return SMALL_NONFINITE
    k = _scalars(p, host[0], host[1], host[2], host[3], host[4], host[5], host[6], host[7],
                 host[8])  # fmt: skip
    _update(p, g, m, v, vmax, 0, p.size, k, decoupled, l2, maximize)
    return SMALL_UPDATED


def step_one_half(p, g, m, v, vmax, host, decoupled, l2, maximize, check, half,
                  stochastic, key, index_base):  # fmt: skip
    """:func:`step_one` for a float16 or bfloat16 leaf with float32 moments.

    ``p`` holds the leaf's bits (uint16), ``g`` its gradient's bits (uint16, the leaf's
    format) or float32 values; ``half`` is the format (0 float16, 1 bfloat16),
    ``stochastic`` the parameters' rounding, ``key`` the step's parameter key
    (:func:`~adamnp.lowbit.half.param_key`) and ``index_base`` the group's first hash index.
    The update is :func:`.half.step_half`'s loop (:func:`~.half.update_half`): the same
    bits. A half gradient is non-finite when NaN or Inf, or for bfloat16 of magnitude at or
    above the float32 limit (:mod:`.reduce`).
    """
    fmt = format_tag(half, stochastic)
    g_half = True if g.itemsize == 2 else None  # None: compile only the float32 test
    return _step_one_half(p, g, m, v, vmax, host, decoupled, l2, maximize, check, fmt, key,
                          index_base, g_half)  # fmt: skip


@jit()
def _step_one_half(p, g, m, v, vmax, host, decoupled, l2, maximize, check, fmt, key,
                   index_base, g_half):  # fmt: skip
    """:func:`step_one_half` with the format tag ``fmt`` (:func:`~.half.format_tag`);
    ``g_half`` True for a half gradient, None for a float32 one (each compiles its own
    test)."""
    if _shares_memory(p, g, m, v, m[:0] if vmax is None else vmax):
        return SMALL_SHARES_MEMORY
    if check:
        limit = LIMIT_BF16 if tag_format(fmt) == 1 else LIMIT_F16
        if g_half is not None:
            if half_bits_nonfinite(g.ctypes.data, g.size, limit):
                return SMALL_NONFINITE
        elif f32_bits_nonfinite(g.ctypes.data, g.size):
            return SMALL_NONFINITE
    k = _scalars(m, host[0], host[1], host[2], host[3], host[4], host[5], host[6], host[7],
                 host[8])  # fmt: skip
    update_half(p, g, m, v, vmax, 0, p.size, k, decoupled, l2, maximize, fmt, key, index_base)
    return SMALL_UPDATED
