"""The 8-bit step and quantizer on AVX-512 VBMI: in-register map lookups, decade arithmetic.

Where the CPU has AVX-512 VBMI (:data:`.avx512.HAVE_VBMI`, e.g. Zen 4, Ice Lake and later) the
8-bit step's map lookups are ``vpermi2b`` byte-plane permutes (:func:`.avx512.dequant64`) and
its requantization is the decade arithmetic of :mod:`adamnp.lowbit.decades`
(:func:`.avx512.requant64`), with the rare flagged value redone by the exact table lookup; no
gathers. The decade arithmetic multiplies by ``1 / absmax``, which must be a normal float32
(it overflows for an absmax below ``2**-128``): a block whose absmax lies outside
``[2**-126, 2**126]`` is requantized by the exact division instead, as the gather kernel
does every block. Results are bit for bit those of the portable kernel (:mod:`.q8`). Which
of the two runs is decided in one place, :func:`adamnp.backends.numba.q8_kernel`.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .avx512 import dequant64, prefetch, requant64, requant64_nonneg
from .q8 import _abs_bits
from .quant import _block_divisor, block_keys, element_uniform, quantize_scaled, round_up
from .util import as_pointer, elem, jit

_INF_BITS = np.int32(0x7F800000)
# The decade arithmetic scales by 1 / scale, which must be a normal float32 for the product
# to stay within the few ulps of x / scale that the fast path's flags cover (docs of
# requant64, tools/sweep_fast_quantizer.py). A block whose divisor lies outside
# [2**-126, 2**126] divides exactly, element by element, instead: below 2**-126 (a
# subnormal absmax) 1 / scale exceeds 2**126 and from 2**-128 down overflows to inf, which
# gave every value of the block code 0; above 2**126 it is subnormal (relative error up to
# 2**-22 instead of 2**-24). Rare blocks; one comparison per block otherwise.
_FAST_MIN = np.float32(2.0**-126)
_FAST_MAX = np.float32(2.0**126)


@jit(inline="always")
def requant_group(x, x_at, o, scale, inverse, codes, codes_at, e, zero, decades, table, shift, lo,
                  nb, nonneg):  # fmt: skip
    """Codes of the 64 values ``x[o:o + 64] / scale`` into ``codes[e:e + 64]`` (AVX-512 VBMI).

    :func:`~.avx512.requant64` (``requant64_nonneg`` if `nonneg`: all ``x >= 0`` with an
    unsigned map) with ``inverse = 1 / scale``, then the values it flagged (about 1 in
    10,000) again with the exact table lookup. ``x_at`` and ``codes_at`` are the data
    addresses of ``x`` and ``codes``, ``decades`` those of the ``DecadeTables`` arrays.
    """
    o = np.uint64(o)
    e = np.uint64(e)
    src, dst = x_at + np.uint64(4) * o, codes_at + e
    if nonneg:
        flagged = requant64_nonneg(src, inverse, dst, decades[0], decades[1], zero)
    else:
        flagged = requant64(src, inverse, dst, decades[0], decades[1], zero)
    if flagged:
        for i in range(np.uint64(64)):
            if (flagged >> i) & np.uint64(1):
                codes[e + i] = quantize_scaled(x[o + i] / scale, table, shift, lo, nb)


# The block functions below are compiled once and called (not inlined) by the 8-bit step
# kernel: inlining their vector code at each of its call sites made the kernel's first
# compilation far slower. They take data addresses instead of arrays except for the scratch
# they read or write, which must stay an argument so that the kernel keeps it alive up to the
# call: Numba passes an array as seven machine words, and pushing them per call cost the step
# measurably (docs/backends.md, "Measurements behind the code").
@jit(inline="always")
def _view(address, like, n):
    """The ``n`` elements of type ``like`` at ``address``, as an array (no copy, no owner)."""
    return numba.carray(as_pointer(np.uint64(address), like), np.uint64(n))


@jit(inline="always")
def _dequantize_inline(codes_at, e, n, planes_at, map_at, scale, out, o):
    out_at = out.ctypes.data
    whole = n & ~np.uint64(63)
    for j in range(np.uint64(0), whole, np.uint64(64)):
        dequant64(codes_at + e + j, planes_at, out_at + np.uint64(4) * (o + j), scale)
    if whole < n:
        codes, qmap = _view(codes_at, np.uint8, e + n), _view(map_at, np.float32, 256)
        for i in range(whole, n):
            out[o + i] = qmap[codes[e + i]] * scale


@jit(inline="always")
def _requantize_inline(x, o, n, scale, codes_at, e, zero, decades, quant, nonneg):
    x_at, codes = x.ctypes.data, _view(codes_at, np.uint8, e + n)
    table_at, size, shift, lo, nb = quant
    table = _view(table_at, np.int32, size)
    inverse = np.float32(1) / scale
    # a scale outside [_FAST_MIN, _FAST_MAX]: every value by the exact division of the tail loop
    fast = scale >= _FAST_MIN and scale <= _FAST_MAX
    whole = n & ~np.uint64(63) if fast else np.uint64(0)
    for j in range(np.uint64(0), whole, np.uint64(64)):
        requant_group(x, x_at, o + j, scale, inverse, codes, codes_at, e + j, zero, decades,
                      table, shift, lo, nb, nonneg)  # fmt: skip
    for i in range(whole, n):
        codes[e + i] = quantize_scaled(x[o + i] / scale, table, shift, lo, nb)


@jit()
def dequantize_block(codes_at, e, n, planes_at, map_at, scale, out, o):
    """``out[o:o + n] = map[codes[e:e + n]] * scale`` by in-register lookups (AVX-512 VBMI).

    :func:`~.avx512.dequant64` for each 64 codes, a plain loop for the last ``n % 64``.
    ``codes_at``, ``planes_at`` and ``map_at`` are the data addresses of the codes (uint8),
    the map's byte planes and the map (256 float32); offsets and ``n`` are uint64.
    """
    _dequantize_inline(codes_at, e, n, planes_at, map_at, scale, out, o)


@jit()
def requantize_block(x, o, n, scale, codes_at, e, zero, decades, quant, nonneg):
    """``codes[e:e + n]`` = the codes of ``x[o:o + n] / scale`` (AVX-512 VBMI).

    :func:`requant_group` for each 64 values, the exact table lookup for the last ``n % 64``
    (for all ``n`` values when ``scale`` lies outside ``[2**-126, 2**126]``, where its inverse
    is not a normal float32); `nonneg` as there. ``codes_at`` is the data address of the codes
    (uint8), ``quant = (address, size, shift, lo, nb)`` the exact quantizer's table and
    parameters (:func:`~adamnp.lowbit.exact.build_quant_tables`). Offsets and ``n`` are
    uint64.
    """
    _requantize_inline(x, o, n, scale, codes_at, e, zero, decades, quant, nonneg)


@jit()
def turn_over(sm, sv, prv, bs, redo, scales, cur, n, scales_now, e, codes_at, zeros, decades,
              quants, planes, maps_at):  # fmt: skip
    """One call per block of the 8-bit step for both moments: finish one block, open the next.

    First :func:`requantize_block` the previous block (``bs`` values at ``x[prv:]``, codes from
    ``e - bs``) where ``redo = (m?, v?)`` with its divisors ``scales``, then
    :func:`dequantize_block` the ``n`` codes from ``e`` (none when ``n`` is 0) to ``x[cur:]``
    with the absmax ``scales_now``; ``x`` is ``sm`` for m (signed map) and ``sv`` for v. The
    other arguments are pairs (m, v) of the arguments of those functions. One call instead of
    four: each call pushes its arguments and saves registers.
    """
    if redo[0]:
        _requantize_inline(sm, prv, bs, scales[0], codes_at[0], e - bs, zeros[0], decades[0],
                    quants[0], False)  # fmt: skip
    if redo[1]:
        _requantize_inline(sv, prv, bs, scales[1], codes_at[1], e - bs, zeros[1], decades[1],
                    quants[1], True)  # fmt: skip
    if n:
        _dequantize_inline(codes_at[0], e, n, planes[0], maps_at[0], scales_now[0], sm, cur)
        _dequantize_inline(codes_at[1], e, n, planes[1], maps_at[1], scales_now[1], sv, cur)


@jit()
def round_block_stochastic(x, o, n, scale, codes_at, e, planes_at, map_at, key, t):
    """:func:`round_stochastic` with in-register lookups (AVX-512 VBMI).

    Arguments as in :func:`requantize_block`; ``planes_at`` holds the addresses of the byte
    planes of the map and of its two :func:`~adamnp.lowbit.stochastic.gap_tables`, ``map_at``
    that of the
    map. :func:`~.avx512.dequant64` looks up all three for 64 codes at a time into
    ``x[t:t + 192]``, a scratch. (Looking up one gap by an index computed into memory first
    was slower: the 64-byte load of that index waits for its smaller stores.)
    """
    codes, qmap = _view(codes_at, np.uint8, e + n), _view(map_at, np.float32, 256)
    tmp_at = x.ctypes.data + np.uint64(4) * np.uint64(t)
    tmp = _view(tmp_at, np.float32, 192)
    inverse = np.float32(1) / scale
    key0, key1, low = block_keys(key, e)
    whole = n & ~np.uint64(63)
    for j in range(np.uint64(0), whole, np.uint64(64)):
        ej, oj = e + j, o + j
        dequant64(codes_at + ej, planes_at[0], tmp_at, np.float32(1))  # map[c]
        dequant64(codes_at + ej, planes_at[1], tmp_at + np.uint64(256), np.float32(1))  # up gap
        dequant64(codes_at + ej, planes_at[2], tmp_at + np.uint64(512), np.float32(1))  # down gap
        for i in range(np.uint64(64)):  # both moves, no select of loads (it became a gather)
            d = x[oj + i] * inverse - tmp[i]
            u = element_uniform(j + i, key0, key1, low)
            up = np.uint8(d >= np.float32(0) and u * tmp[64 + i] < d)
            down = np.uint8(d < np.float32(0) and u * tmp[128 + i] < -d)
            codes[ej + i] = np.uint8(codes[ej + i] + up - down)
    for i in range(whole, n):
        u = element_uniform(i, key0, key1, low)
        codes[e + i] = round_up(x[o + i] * inverse, codes[e + i], qmap, u)


@jit(parallel=True)
def quantize_blockwise_simd(x, block_size, table, shift, lo, nb, codes, absmax, binades, lines,
                            zero):  # fmt: skip
    """`quantize_blockwise` with the decade arithmetic of :func:`requant_group` (AVX-512 VBMI).

    ``binades``, ``lines`` and ``zero`` are the map's ``DecadeTables``; the codes are the same.
    A block whose absmax lies outside ``[2**-126, 2**126]`` is quantized by the exact
    division (as the tail).
    """
    n = x.size
    x_at, codes_at = x.ctypes.data, codes.ctypes.data
    decades = (binades.ctypes.data, lines.ctypes.data)
    for b in prange(absmax.size):
        start = np.uint64(b * block_size)
        stop = np.uint64(min(b * block_size + block_size, n))
        absmax[b], scale = _block_divisor(x, start, stop)
        if not np.isfinite(absmax[b]):
            continue
        inverse = np.float32(1) / scale
        whole = start + ((stop - start) & ~np.uint64(63))
        if not (scale >= _FAST_MIN and scale <= _FAST_MAX):  # the exact division throughout
            whole = start
        for o in range(start, whole, np.uint64(64)):  # inlined here: a call per block is slower
            requant_group(x, x_at, o, scale, inverse, codes, codes_at, o, zero, decades, table,
                          shift, lo, nb, False)  # fmt: skip
        for i in range(whole, stop):
            codes[i] = quantize_scaled(x[i] / scale, table, shift, lo, nb)


@jit(inline="always")
def _prefetch_lines(address, size):
    """Prefetch (into L2) the cache lines of ``size`` bytes from ``address``."""
    for line in range(np.uint64(0), np.uint64(size), np.uint64(64)):
        prefetch(np.uint64(address) + line)


@jit(inline="always")
def _close_block(bits, absmax, b, codes, e, n, zero):
    """Store block ``b``'s absmax from ``bits``; return ``(requantize?, divisor)``.

    A block holding NaN or Inf stores absmax NaN and gets the zero code right away.
    """
    if bits >= _INF_BITS:
        absmax[b] = np.float32(np.nan)
        for i in range(np.uint64(0), np.uint64(n)):
            codes[np.uint64(e) + i] = zero
        return False, np.float32(1)
    scale = np.int32(bits).view(np.float32)
    absmax[b] = scale
    if bits == 0:
        scale = np.float32(1.0)
    return True, scale


@jit()
def step_q8_simd(
    table, leaf_ids, offsets, block_offsets, block_size, p_addr, g_addr,
    codes, absmax, map_m, map_v, quant_m, quant_v, zeros, k, flags, stochastic, key, planes,
    decades, vmax,
):  # fmt: skip
    """:func:`step_q8` with in-register table lookups (AVX-512 VBMI, :mod:`.avx512`).

    The extra arguments are ``planes`` (byte planes of map_m, map_v and map_v's two gap
    tables, the last two for stochastic rounding), ``decades =
    ((binades, lines) of map_m, of map_v)`` (:class:`~adamnp.lowbit.decades.DecadeTables`) and
    ``vmax``: None without amsgrad, else True (the vmax entries of ``codes`` and ``absmax``
    are used). ``stochastic`` is None for nearest rounding of ``v``, else True. The branches
    on them are decided before typing (:class:`.util._PruneOnArgumentTypes`), so a state
    compiles neither amsgrad's code nor stochastic rounding's unless it uses them, and with
    amsgrad not the loop without it. Results are bit for bit
    those of :func:`step_q8`. A serial function: the batch scheduler runs every call on one
    thread, and the vector code sits in the called block functions, so the loop needs no
    parallel region for its speed.

    Block ``i - 1`` is requantized right before block ``i`` is dequantized and updated (its
    new absmax is known by then), in one call per block (:func:`turn_over`),
    and p, g and the codes two blocks ahead are prefetched into L2; the scratch holds two
    blocks. The vector code lives in the called block functions above, not inlined: inlined
    at every call site it made the first compilation of this kernel far slower.
    """
    decoupled, l2, amsgrad, maximize = flags
    codes_m, codes_v, codes_x = codes
    absmax_m, absmax_v, absmax_x = absmax
    tm, shm, lom, nbm = quant_m
    tv, shv, lov, nbv = quant_v
    zero_m, zero_v = zeros
    # data addresses once: `array.ctypes` in the loop would update a shared reference count
    codes_at = (codes_m.ctypes.data, codes_v.ctypes.data, codes_x.ctypes.data)
    dec_m = (decades[0][0].ctypes.data, decades[0][1].ctypes.data)
    dec_v = (decades[1][0].ctypes.data, decades[1][1].ctypes.data)
    planes_m, planes_v = planes[0].ctypes.data, planes[1].ctypes.data
    planes_sr = (planes_v, planes[2].ctypes.data, planes[3].ctypes.data)  # map_v, gaps
    maps_at = (map_m.ctypes.data, map_v.ctypes.data)
    q_m = (tm.ctypes.data, tm.size, shm, lom, nbm)
    q_v = (tv.ctypes.data, tv.size, shv, lov, nbv)
    bs = np.uint64(block_size)
    width = 2 * block_size if amsgrad else 0
    for c in range(table.shape[0]):
        j, lo, hi = table[c, 0], table[c, 1], table[c, 2]
        sm = np.empty(2 * block_size, np.float32)
        sv = np.empty(2 * block_size + (0 if stochastic is None else 192), np.float32)  # tail: SR's
        sx = np.empty(width, np.float32)
        sr_scratch = np.uint64(2) * bs  # where the stochastic pass's scratch starts in sv
        size = np.uint64(hi - lo)
        p_at = np.uint64(p_addr[leaf_ids[j]] + lo * 4)
        g_at = np.uint64(g_addr[leaf_ids[j]] + lo * 4)
        p = numba.carray(as_pointer(p_at, np.float32), size)
        g = numba.carray(as_pointer(g_at, np.float32), size)
        b = block_offsets[j] + lo // block_size
        blocks = (size + bs - np.uint64(1)) // bs  # the last one may be partial
        base = np.uint64(offsets[j] + lo)
        # the previous block's: requantize?, divisor (np.bool_: a literal False would type
        # turn_over's first call apart from the loop's and compile it twice)
        rq_m, sc_m = np.bool_(False), np.float32(1)
        rq_v, sc_v = np.bool_(False), np.float32(1)
        rq_x, sc_x = np.bool_(False), np.float32(1)
        for kb in range(np.uint64(0), blocks + np.uint64(1)):
            s = kb * bs
            e = base + s
            cur = (kb & np.uint64(1)) * bs  # this block's half of the scratch
            prv = bs - cur
            last = kb == blocks
            ahead = kb + np.uint64(3) < blocks  # prefetch the block after next, in 2 parts
            pf = s + np.uint64(2) * bs
            if ahead:
                _prefetch_lines(p_at + np.uint64(4) * pf, np.uint64(4) * bs)
                _prefetch_lines(g_at + np.uint64(4) * pf, np.uint64(4) * bs)
            n = np.uint64(0) if last else min(bs, size - s)
            am = np.float32(1) if last else absmax_m[b]
            av = np.float32(1) if last else absmax_v[b]
            # codes of the previous (always full) block, now that its absmax is known, and the
            # moments of this one
            redo = (rq_m, rq_v)
            turn_over(sm, sv, prv, bs, redo, (sc_m, sc_v), cur, n, (am, av), e, codes_at, zeros,
                      (dec_m, dec_v), (q_m, q_v), (planes_m, planes_v), maps_at)  # fmt: skip
            if ahead:
                _prefetch_lines(codes_at[0] + base + pf, bs)
                _prefetch_lines(codes_at[1] + base + pf, bs)
            if stochastic is not None and rq_v:
                round_block_stochastic(sv, prv, bs, sc_v, codes_at[1], e - bs, planes_sr,
                                       maps_at[1], key, sr_scratch)  # fmt: skip
            if vmax is not None and rq_x:
                requantize_block(sx, prv, bs, sc_x, codes_at[2], e - bs, zero_v, dec_v, q_v, True)
            if last:
                break
            xm = np.int32(0)
            xv = np.int32(0)
            xx = np.int32(0)
            if vmax is not None:
                ax = absmax_x[b]
                dequantize_block(codes_at[2], e, n, planes_v, maps_at[1], ax, sx, cur)
                for i in range(cur, cur + n):
                    q = s + i - cur
                    p[q], m, v, x = elem(
                        p[q], g[q], sm[i], sv[i], sx[i], k, decoupled, l2, True, maximize
                    )
                    sm[i], sv[i], sx[i] = m, v, x
                    xm = max(xm, _abs_bits(m))
                    xv = max(xv, _abs_bits(v))
                    xx = max(xx, _abs_bits(x))
            else:
                for i in range(cur, cur + n):
                    q = s + i - cur
                    m0 = sm[i]
                    p[q], m, v, _ = elem(
                        p[q], g[q], m0, sv[i], m0, k, decoupled, l2, False, maximize
                    )
                    sm[i], sv[i] = m, v
                    xm = max(xm, _abs_bits(m))
                    xv = max(xv, _abs_bits(v))
            rq_m, sc_m = _close_block(xm, absmax_m, b, codes_m, e, n, zero_m)
            rq_v, sc_v = _close_block(xv, absmax_v, b, codes_v, e, n, zero_v)
            if vmax is not None:
                rq_x, sc_x = _close_block(xx, absmax_x, b, codes_x, e, n, zero_v)
            if n < bs:  # a partial block is a leaf's last: its codes now (turn_over with
                # nothing to open: the same compiled call as every block's)
                turn_over(sm, sv, cur, n, (rq_m, rq_v), (sc_m, sc_v), cur, np.uint64(0),
                          (am, av), e + n, codes_at, zeros, (dec_m, dec_v), (q_m, q_v),
                          (planes_m, planes_v), maps_at)  # fmt: skip
                if stochastic is not None and rq_v:
                    round_block_stochastic(sv, cur, n, sc_v, codes_at[1], e, planes_sr,
                                           maps_at[1], key, sr_scratch)  # fmt: skip
                if vmax is not None and rq_x:
                    requantize_block(sx, cur, n, sc_x, codes_at[2], e, zero_v,
                                    dec_v, q_v, True)  # fmt: skip
                break
            b += 1
