"""Numba CPU kernel of the fused multi-tensor 8-bit step.

One call of :func:`step_q8` updates every leaf of an 8-bit
:class:`~adamnp._state.LeafGroup`. ``prange`` runs over a table of chunks ``(leaf, start,
stop)`` whose starts are multiples of the block size, so every chunk holds whole quantization
blocks (the leaf's last block may be partial). Each block is two passes over L1-resident data:

1. *update*: dequantize ``m`` and ``v`` (and amsgrad's ``vmax``) with the old absmax
   (``map[code] * absmax``, one table lookup each), run
   :func:`~adamnp.backends.math.adam_elem` inlined, write ``p``, keep the new moments in a
   scratch of one block, and take their new absmax as an integer max over the bits of
   ``|x|`` (vectorizes; a float max does not; a result ``>= 0x7F800000`` means NaN or Inf in
   the block);
2. *requantize*: ``code = quantize(x / absmax)``, the nearest map value (absmax 0 divides
   by 1, giving the zero code). A block holding NaN or Inf stores absmax NaN and the map's
   zero code everywhere.

Memory traffic per element: read ``p``, ``g`` and two codes, write ``p`` and two codes
(16 bytes against 28 for float32 moments). The scratch (at most ``6 * block_size`` float32)
is allocated once per chunk; nothing proportional to the leaves. The order of operations is
the reference's (:func:`adamnp.backends.numpy.step_group`), without fast-math, so params and
absmax equal it bit for
bit and codes are identical, whatever the number of threads.

Two kernels, the same bits. :func:`step_q8_simd` runs where the CPU has AVX-512 VBMI
(:data:`~.avx512.HAVE_VBMI`, e.g. Zen 4, Ice Lake and later): its map lookups are
``vpermi2b`` byte-plane permutes (:func:`~.avx512.dequant64`) and its requantization is
the decade arithmetic of :mod:`adamnp.lowbit.decades` (:func:`~.avx512.requant64`), with the rare
flagged value redone by the exact table lookup; no gathers. :func:`step_q8` runs elsewhere:
LLVM turns its four table lookups per element (two ``map[code]``, two quantizer table
entries) into gathers only if it knows that the tables do not alias the arrays being written.
So the kernel and its block functions are compiled with ``noalias`` arguments
(:func:`~.util.jit`'s ``noalias=True``, Numba's flag for the body of a parallel loop, which
this kernel used to get that way: the same code, in half the compile time), and the block
functions are inlined by LLVM (``forceinline``), not copied by Numba; every array they are
given is a separate buffer (the parameters and gradients are checked not to overlap anything).
``tests/test_numba_cpu.py`` checks the assembly of both kernels. Either kernel is bound by
its arithmetic (lookups, two divisions and a square root per element), not by memory, where
the float32 step is memory-bound; see ``docs/backends.md`` for measured numbers.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .half import data_address, load_half, store_half
from .quant import quantize_scaled, round_stochastic
from .schedule import launch_traffic
from .util import as_pointer, elem, jit

_SIGN_OFF = np.int32(0x7FFFFFFF)
_INF_BITS = np.int32(0x7F800000)


@jit(inline="always")
def _abs_bits(x):
    """The bits of ``|x|`` as int32 (monotone in ``|x|``; NaN and Inf above 0x7F7FFFFF)."""
    return np.int32(np.float32(x).view(np.int32) & _SIGN_OFF)


@jit(noalias=True, forceinline=True)
def _update_block(p, g, s, n, codes_m, codes_v, e, am, av, sm, sv, map_m, map_v, k, decoupled,
                  l2, maximize):  # fmt: skip
    """Pass 1 over the ``n`` elements of one block (without amsgrad); returns the new absmax
    bits of ``m`` and ``v``.

    The block is ``p[s:s + n]``, ``g[s:s + n]`` and ``codes_*[e:e + n]``; the new moments go
    to ``sm`` and ``sv``. Offsets are added to unsigned loop indices (no wraparound checks).
    Compiled with ``noalias`` arguments, which let LLVM vectorize the map lookups (gathers)
    next to the stores.
    """
    s = np.uint64(s)
    e = np.uint64(e)
    xm = np.int32(0)
    xv = np.int32(0)
    for i in range(np.uint64(0), np.uint64(n)):
        m0 = map_m[codes_m[e + i]] * am
        v0 = map_v[codes_v[e + i]] * av
        p[s + i], m, v, _ = elem(p[s + i], g[s + i], m0, v0, m0, k, decoupled, l2, False, maximize)
        sm[i], sv[i] = m, v
        xm = max(xm, _abs_bits(m))
        xv = max(xv, _abs_bits(v))
    return xm, xv


@jit(noalias=True, forceinline=True)
def _update_block_amsgrad(p, g, s, n, codes_m, codes_v, codes_x, e, am, av, ax, sm, sv, sx,
                          map_m, map_v, k, decoupled, l2, maximize):  # fmt: skip
    """:func:`_update_block` with amsgrad's ``vmax`` (new values to ``sx``, its absmax bits
    third)."""
    s = np.uint64(s)
    e = np.uint64(e)
    xm = np.int32(0)
    xv = np.int32(0)
    xx = np.int32(0)
    for i in range(np.uint64(0), np.uint64(n)):
        m0 = map_m[codes_m[e + i]] * am
        v0 = map_v[codes_v[e + i]] * av
        x0 = map_v[codes_x[e + i]] * ax
        p[s + i], m, v, x = elem(p[s + i], g[s + i], m0, v0, x0, k, decoupled, l2, True, maximize)
        sm[i], sv[i], sx[i] = m, v, x
        xm = max(xm, _abs_bits(m))
        xv = max(xv, _abs_bits(v))
        xx = max(xx, _abs_bits(x))
    return xm, xv, xx


@jit(noalias=True, forceinline=True)
def _requantize_gather(x, n, bits, codes, e, absmax, b, zero, table, shift, lo, nb):
    """Pass 2: store block ``b``'s absmax (from ``bits``) and the codes of ``x[:n]``."""
    e = np.uint64(e)
    if bits >= _INF_BITS:  # NaN or Inf in the block: keep it visible as absmax NaN
        absmax[b] = np.float32(np.nan)
        for i in range(np.uint64(0), np.uint64(n)):
            codes[e + i] = zero
        return
    scale = np.int32(bits).view(np.float32)
    absmax[b] = scale
    if bits == 0:
        scale = np.float32(1.0)
    for i in range(np.uint64(0), np.uint64(n)):
        codes[e + i] = quantize_scaled(x[i] / scale, table, shift, lo, nb)


@jit(inline="always")
def _f32_at(address, n):
    return numba.carray(as_pointer(address, np.float32), n)


@jit(noalias=True)
def step_q8(
    table, leaf_ids, offsets, block_offsets, block_size, p_addr, g_addr,
    codes, absmax, map_m, map_v, quant_m, quant_v, zeros, k, flags, stochastic, key,
    fmt, g_half, p_key, index_base, vmax,
):  # fmt: skip
    """Update all chunks of ``table`` in place.

    ``p_addr``/``g_addr`` hold the data addresses of all leaves of the tree, ``leaf_ids`` maps
    a group's leaf to its tree index, ``offsets`` and ``block_offsets`` locate it in the code
    buffers ``codes = (m, v, vmax)`` and absmax buffers ``absmax = (m, v, vmax)`` (the vmax
    entries are empty unless amsgrad). ``map_m``/``map_v`` are the 256-value maps, ``quant_m``
    and ``quant_v`` their ``(table, shift, lo, nb)`` lookup tables, ``zeros`` the codes of 0.0
    in each map; ``k`` are the :class:`~adamnp.backends.math.KernelScalars` and ``flags =
    (decoupled_decay, l2_decay, amsgrad, maximize)``. ``stochastic`` is None for nearest
    rounding of ``v``, else True: the codes of ``v`` are then rounded stochastically
    (:mod:`adamnp.lowbit.stochastic`) with the step's hash ``key``, element ``e`` of the
    buffers under the hash index ``index_base + e`` (int64; the parameters' stochastic
    rounding too). Chunk starts must be multiples of ``block_size``. The loop body creates
    no array views (see :func:`_update_block`). ``vmax`` is None without amsgrad, else True.

    Half-precision parameters (``fmt`` the tag of their format and rounding,
    :func:`~.half.format_tag`; None for float32) are upcast per chunk into a float32
    scratch, as are the gradients of the leaves whose ``g_half`` is nonzero (per leaf of the
    group; may be empty for float32), and rounded back after the chunk's blocks
    (stochastically: with the parameter key ``p_key``; :func:`~.half.load_half`,
    :func:`~.half.store_half`).

    The branches on ``x is None`` of an argument are decided before typing
    (:class:`.util._PruneOnArgumentTypes`), so a state compiles amsgrad's code, stochastic
    rounding's and the half-precision conversions only if it uses them, and with amsgrad not
    the loop without it (a compile of 4 s instead of 17 for float32 params alone).
    """
    decoupled, l2, amsgrad, maximize = flags
    codes_m, codes_v, codes_x = codes
    absmax_m, absmax_v, absmax_x = absmax
    tm, shm, lom, nbm = quant_m
    tv, shv, lov, nbv = quant_v
    zero_m, zero_v = zeros
    width = block_size if amsgrad else 0
    map_v_at = map_v.ctypes.data
    for c in range(table.shape[0]):
        j, lo, hi = table[c, 0], table[c, 1], table[c, 2]
        sm = np.empty(block_size, np.float32)
        sv = np.empty(block_size, np.float32)
        sx = np.empty(width, np.float32)
        # half params (and grads): upcast into one scratch, rounded back after the blocks.
        # p and g are views by address; float32 params (fmt None) compile no conversion.
        size = hi - lo
        scratch = np.empty(0 if fmt is None else 2 * size, np.float32)
        at = data_address(scratch)
        if fmt is None:
            p_at = p_addr[leaf_ids[j]] + lo * 4
            g_at = g_addr[leaf_ids[j]] + lo * 4
        else:
            p_at = at
            load_half(p_addr[leaf_ids[j]] + lo * 2, size, fmt, _f32_at(at, size))
            g_at = g_addr[leaf_ids[j]] + lo * 4
            if g_half[j]:
                g_at = at + size * 4
                load_half(g_addr[leaf_ids[j]] + lo * 2, size, fmt, _f32_at(g_at, size))
        p = _f32_at(p_at, size)
        g = _f32_at(g_at, size)
        b = block_offsets[j] + lo // block_size
        for s in range(0, hi - lo, block_size):
            n = min(block_size, hi - lo - s)
            e = offsets[j] + lo + s
            if vmax is None:
                xm, xv = _update_block(
                    p, g, s, n, codes_m, codes_v, e, absmax_m[b], absmax_v[b], sm, sv, map_m,
                    map_v, k, decoupled, l2, maximize,
                )  # fmt: skip
            else:
                xm, xv, xx = _update_block_amsgrad(
                    p, g, s, n, codes_m, codes_v, codes_x, e, absmax_m[b], absmax_v[b],
                    absmax_x[b], sm, sv, sx, map_m, map_v, k, decoupled, l2, maximize,
                )  # fmt: skip
            _requantize_gather(sm, n, xm, codes_m, e, absmax_m, b, zero_m, tm, shm, lom, nbm)
            _requantize_gather(sv, n, xv, codes_v, e, absmax_v, b, zero_v, tv, shv, lov, nbv)
            if stochastic is not None and xv < _INF_BITS:
                # the map by address (inside the parallel loop this kernel had until
                # 2026-12-06, passing map_v itself cost the loop body its noalias)
                qmap = numba.carray(as_pointer(map_v_at, np.float32), 256)
                round_stochastic(sv, 0, n, absmax_v[b] if xv else np.float32(1), codes_v, e,
                                 qmap, key, index_base + e)  # fmt: skip
            if vmax is not None:
                _requantize_gather(sx, n, xx, codes_x, e, absmax_x, b, zero_v, tv, shv, lov, nbv)
            b += 1
        if fmt is not None:
            store_half(p_addr[leaf_ids[j]] + lo * 2, scratch, hi - lo, fmt, p_key,
                       index_base + offsets[j] + lo)  # fmt: skip


@jit()
def _traffic_q8_chunk(p, g, codes_m, codes_v):
    for i in range(p.size):
        p[i] = p[i] + g[i]
        codes_m[i] = codes_m[i] + np.uint8(1)
        codes_v[i] = codes_v[i] + np.uint8(1)


@jit(parallel=True)
def _traffic_q8(table, p, g, codes_m, codes_v):
    for c in prange(table.shape[0]):
        lo, hi = table[c, 1], table[c, 2]
        _traffic_q8_chunk(p[lo:hi], g[lo:hi], codes_m[lo:hi], codes_v[lo:hi])


def traffic_kernel_q8(p, g, codes_m, codes_v) -> None:
    """Move the element bytes of an 8-bit step without its math: ``p += g; codes += 1``.

    Reads ``p``, ``g`` and two uint8 code arrays and writes ``p`` and the codes (16 bytes per
    element; the absmax traffic, 16 bytes per block, is left out) with the chunking of
    :func:`step_q8`. The 8-bit step time over this kernel's says how far the step is from
    the memory bandwidth.

    Examples
    --------
    >>> p, g = np.ones(5, np.float32), np.ones(5, np.float32)
    >>> cm, cv = np.zeros(5, np.uint8), np.full(5, 255, np.uint8)
    >>> traffic_kernel_q8(p, g, cm, cv)
    >>> p, cm.tolist(), cv.tolist()
    (array([2., 2., 2., 2., 2.], dtype=float32), [1, 1, 1, 1, 1], [0, 0, 0, 0, 0])
    """
    flat = (x.reshape(-1) for x in (p, g, codes_m, codes_v))
    launch_traffic(_traffic_q8, *flat)
