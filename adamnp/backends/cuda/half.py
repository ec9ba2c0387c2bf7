"""Half-precision (float16, bfloat16) leaves on the ``"cuda"`` backend, built by :func:`build`.

A float16 or bfloat16 parameter is read and written as its ``uint16`` bits
(:func:`.util.bits_ptr`: numba-cuda types no bfloat16, and its float16 intrinsics could
round differently) and converted with the scalar functions of :mod:`adamnp.lowbit.half`
compiled as device functions (:func:`device_functions`): exact upcast to float32, the
float32 update, rounding back to nearest or stochastically. The stochastic rounding's
random ``u`` of an element is ``mix32(index_low ^ block_key(key, index_high))`` of its
hash index, the group's ``index_base`` plus its index in the group's buffers, ``key`` the
step's :func:`~adamnp.lowbit.half.param_key`: the reference's
(:class:`adamnp.backends.numpy._HalfParams`) bit for bit.

:func:`build` (per format, a compile-time constant of the kernels) defines

* ``adam_step_half``: the float32-moment step of a half-precision group, the multi-tensor
  launch of :mod:`.fp32`'s ``adam_step`` with a third column in the address table: 1 where
  the leaf's gradient is half (the params' format), 0 where it is float32;
* ``grad_stats_half``: :mod:`.fp32`'s ``grad_stats`` over half gradients (upcast values;
  bad when ``bits & 0x7FFF`` reaches 0x7C00 for float16, NaN or Inf, or 0x5F00 for
  bfloat16, the top half of the float32 limit ``2**63``).

The 8-bit kernels (:mod:`.q8`, :mod:`.q8_sqrt`) take the format as a build argument and use
:func:`device_functions` around their element math.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np

from ...lowbit import half as fmt
from ...lowbit.stochastic import block_key, mix32
from ..math import adam_elem, grad_limit_bits
from .util import bits_ptr, flags_types, leaf_ptr, rebind, scalars_type, sim_quiet, simulating

#: Per format (0 float16, 1 bfloat16): the ``bits & 0x7FFF`` from which a gradient is bad.
BAD_BITS = (0x7C00, grad_limit_bits(np.float32) >> 16)

# numba.cuda, set by build(): the simulator swaps this module global while a kernel runs.
cuda = None


@functools.cache
def device_functions() -> SimpleNamespace:
    """``to_f32(h, fmt)``, ``round_half(x, u, fmt, stochastic)`` (:mod:`adamnp.lowbit.half`),
    ``mix`` (``mix32``) and ``hash_key`` (``block_key``) for kernels: device functions, or in
    the simulator the plain Python functions (uint32 wraparound without NumPy's warning)."""
    if simulating():
        return SimpleNamespace(to_f32=fmt.to_f32, round_half=sim_quiet(fmt.round_half),
                               mix=sim_quiet(mix32), hash_key=sim_quiet(block_key))  # fmt: skip
    from numba import cuda

    device = cuda.jit(device=True)
    f16, bf16 = device(fmt.f16_to_f32), device(fmt.bf16_to_f32)
    f16_round, bf16_round = device(fmt.f16_round), device(fmt.bf16_round)
    mix = device(mix32)
    return SimpleNamespace(
        to_f32=device(rebind(fmt.to_f32, f16_to_f32=f16, bf16_to_f32=bf16)),
        round_half=device(rebind(fmt.round_half, f16_round=f16_round, bf16_round=bf16_round)),
        mix=mix,
        hash_key=device(rebind(block_key, mix32=mix)),
    )


@functools.cache
def build(half: int) -> SimpleNamespace:
    """The kernels of half-precision format ``half`` (0 float16, 1 bfloat16).

    Parameters
    ----------
    half : int
        The format id (:func:`adamnp.lowbit.half.half_format`).

    Returns
    -------
    SimpleNamespace
        ``adam_step_half`` and ``grad_stats_half``, launched with :mod:`.fp32`'s chunk
        tables (``threads`` and ``chunk`` as there).
    """
    global cuda
    from numba import cuda
    from numba.cuda import types

    from .fp32 import build as build_fp32

    base_k = build_fp32()
    threads, chunk, sim = base_k.threads, base_k.chunk, base_k.sim
    f = device_functions()
    to_f32, round_half, mix, hash_key = f.to_f32, f.round_half, f.mix, f.hash_key
    elem = adam_elem if sim else cuda.jit(device=True)(adam_elem)
    ptr, bits = leaf_ptr(), bits_ptr()
    f64 = types.float64
    half = int(half)
    bad_bits = np.int32(BAD_BITS[half])
    abs16 = np.int32(0x7FFF)
    low32 = np.uint64(0xFFFFFFFF)
    high_shift = np.uint64(32)
    one32 = np.uint32(1)
    no_u = np.uint32(0)

    @cuda.jit
    def adam_step_half(
        ptrs, chunks, offsets, m, v, vmax,
        k, decoupled_decay, l2_decay, amsgrad, maximize, stochastic, key, index_base,
    ):  # fmt: skip
        """One Adam/AdamW step of every leaf of a half-precision group (block c: chunk c);
        ``ptrs[j] = (param, grad, grad is half)``; ``stochastic``: round the params with the
        step's uint32 ``key``, element ``e`` of the buffers under hash index ``index_base +
        e`` (int64)."""
        c = cuda.blockIdx.x
        leaf = chunks[c, 0]
        lo = chunks[c, 1]
        base = offsets[leaf]
        n = offsets[leaf + 1] - base
        hi = min(lo + chunk, n)
        g_half = ptrs[leaf, 2] != 0
        p = bits(ptrs[leaf, 0], n)
        g16 = bits(ptrs[leaf, 1], n if g_half else 0)
        g32 = ptr(ptrs[leaf, 1], 0 if g_half else n, m)
        # The block keys of the chunk's hash indices (it crosses at most one multiple of 2**32).
        hash_base = index_base + base  # the hash index of the leaf's first element
        e0 = np.uint64(hash_base + lo)
        low = np.uint32(e0 & low32)
        high = np.uint32(e0 >> high_shift)
        key0 = hash_key(key, high)
        key1 = hash_key(key, np.uint32(high + one32))
        zero = m.dtype.type(0)
        for i in range(lo + cuda.threadIdx.x, hi, threads):
            e = base + i
            gi = to_f32(g16[i], half) if g_half else g32[i]
            old_max = vmax[e] if amsgrad else zero
            p_new, m_new, v_new, max_new = elem(
                to_f32(p[i], half), gi, m[e], v[e], old_max,
                k, decoupled_decay, l2_decay, amsgrad, maximize,
            )  # fmt: skip
            u = no_u
            if stochastic:
                index = np.uint32(np.uint64(hash_base + i) & low32)
                u = mix(np.uint32(index ^ (key0 if index >= low else key1)))
            p[i] = round_half(p_new, u, half, stochastic)
            m[e] = m_new
            v[e] = v_new
            if amsgrad:
                vmax[e] = max_new

    @cuda.jit
    def grad_stats_half(ptrs, chunks, offsets, sumsq, bad):
        """:mod:`.fp32`'s ``grad_stats`` over half gradients: float64 sum of squares of the
        upcast values per chunk, ``bad[c] = 1`` where ``bits & 0x7FFF >= BAD_BITS[half]``."""
        c = cuda.blockIdx.x
        t = cuda.threadIdx.x
        leaf = chunks[c, 0]
        lo = chunks[c, 1]
        n = offsets[leaf + 1] - offsets[leaf]
        hi = min(lo + chunk, n)
        g = bits(ptrs[leaf, 0], n)
        acc = f64(0.0)
        for i in range(lo + t, hi, threads):
            h = g[i]
            if np.int32(np.int32(h) & abs16) >= bad_bits:
                bad[c] = 1
            y = f64(to_f32(h, half))
            acc += y * y
        part = cuda.shared.array(threads, f64)
        part[t] = acc
        cuda.syncthreads()
        s = threads // 2
        while s > 0:
            if t < s:
                part[t] += part[t + s]
            cuda.syncthreads()
            s //= 2
        if t == 0:
            sumsq[c] = part[0]

    return SimpleNamespace(
        half=half,
        threads=threads,
        chunk=chunk,
        adam_step_half=adam_step_half,
        grad_stats_half=grad_stats_half,
    )


def signatures() -> dict:
    """``{name: (kernel, [argument types])}`` of the half-precision kernels (PTX builds):
    ``adam_step_half_f16``, ``adam_step_half_bf16`` and the two ``grad_stats_half_*``."""
    from numba.cuda import types

    table, ints, offs = types.uint64[:, ::1], types.int64[:, ::1], types.int64[::1]
    a = types.float32[::1]
    step = (table, ints, offs, a, a, a, scalars_type(types.float32), *flags_types(),
            types.boolean, types.uint32, types.int64)  # fmt: skip
    stats = (table, ints, offs, types.float64[::1], types.int32[::1])
    out = {}
    for half, name in enumerate(("f16", "bf16")):
        k = build(half)
        out[f"adam_step_half_{name}"] = (k.adam_step_half, [step])
        out[f"grad_stats_half_{name}"] = (k.grad_stats_half, [stats])
    return out
