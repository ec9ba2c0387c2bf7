"""Numba CPU kernels for blockwise 8-bit quantization.

The kernels take arrays and scalars only and write into preallocated outputs. Blocks are
independent, so ``prange`` runs over blocks and each block is read from memory once: the
absmax pass leaves it in L1 for the quantize pass. Inner loops run over unsigned indices: a
signed index makes Numba emit a negative-index wraparound per access, which stops LLVM from
treating the accesses as contiguous (gathers and scatters instead of plain vector loads).

``cache=True`` keys the on-disk cache on this file only: after editing ``_q8_elem.py`` during
development, delete ``adamnp/backends/__pycache__`` (or touch this file).
"""

import numba
import numpy as np
from numba import njit, prange

from adamnp.backends import _q8_elem, _stochastic
from adamnp.backends._numba_simd import HAVE_VBMI as HAVE_VBMI  # used by adamnp.quant
from adamnp.backends._numba_simd import dequant64, requant64, requant64_nonneg
from adamnp.backends._numba_util import as_pointer

_KERNEL = {"parallel": True, "cache": True, "fastmath": False, "error_model": "numpy"}

quantize_bits = njit(inline="always", error_model="numpy")(_q8_elem.quantize_bits)
mix32 = njit(inline="always", error_model="numpy")(_stochastic.mix32)
round_up = njit(inline="always", error_model="numpy")(_stochastic.round_up)
_HIGH = np.uint64(32)
_LOW = np.uint64(0xFFFFFFFF)


@njit(inline="always", error_model="numpy")
def quantize_scaled(s, table, shift, lo, nb):
    """The code of the float32 scaled value `s`: `quantize_bits` of its bit pattern."""
    return quantize_bits(np.float32(s).view(np.int32), table, shift, lo, nb)


@njit(inline="always", error_model="numpy")
def _block_divisor(x, start, stop):
    """``(absmax, divisor)`` of ``x[start:stop]``; divisor 1 for a block of zeros.

    The absmax is an integer max over the bits of ``|x|`` (it vectorizes; a float max does
    not): NaN or Inf in the block give an absmax at or above ``inf``, the caller's signal.
    """
    amax = 0
    for i in range(np.uint64(start), np.uint64(stop)):
        amax = max(amax, np.float32(x[i]).view(np.int32) & 0x7FFFFFFF)
    scale = np.int32(amax).view(np.float32)
    return scale, np.float32(1.0) if amax == 0 else scale


@njit(inline="always", error_model="numpy")
def block_keys(key, e):
    """The hash keys of the element indices from ``e`` on: ``(key0, key1, low)``.

    ``key0`` and ``key1`` are :func:`~._stochastic.block_key` for ``e``'s high 32 bits and
    the next (a block of at most 4096 elements crosses at most one multiple of 2**32); ``low``
    is ``e``'s low 32 bits. Three scalars: a nested tuple here trips Numba's parfor analysis.
    """
    high = np.uint32(np.uint64(e) >> _HIGH)
    key = np.uint32(key)
    low = np.uint32(np.uint64(e) & _LOW)
    return mix32(key ^ high), mix32(key ^ np.uint32(high + np.uint32(1))), low


@njit(inline="always", error_model="numpy")
def element_uniform(i, key0, key1, low):
    """:func:`~._stochastic.uniform` of element ``e + i`` (``key0, key1, low`` from
    :func:`block_keys` of ``e``), in uint32 arithmetic. Written out here because
    ``_stochastic.uniform`` calls ``mix32`` by a module name Numba cannot compile there."""
    index = np.uint32(low + np.uint32(i))
    h = mix32(index ^ (key0 if index >= low else key1))
    return np.float32(h >> np.uint32(8)) * np.float32(2.0**-24)


@njit(inline="always", error_model="numpy")
def round_stochastic(x, o, n, scale, codes, e, qmap, key):
    """Stochastic rounding of ``codes[e:e + n]``, the nearest codes of ``x[o:o + n] / scale``.

    Element by element (:func:`~._stochastic.round_up`); offsets and ``n`` are uint64. The
    gather kernel inlines it and must pass ``qmap`` as a view made from a raw pointer: the map
    array itself, passed a second time inside its parallel loop, cost that loop its
    ``noalias`` and with it all vectorization.
    """
    inverse = np.float32(1) / scale
    key0, key1, low = block_keys(key, e)
    o = np.uint64(o)
    e = np.uint64(e)
    for i in range(np.uint64(0), np.uint64(n)):
        u = element_uniform(i, key0, key1, low)
        codes[e + i] = round_up(x[o + i] * inverse, codes[e + i], qmap, u)


@njit(**_KERNEL)
def quantize_blockwise(x, block_size, table, shift, lo, nb, codes, absmax):
    """Quantize the 1-D float32 array `x` into `codes` (uint8, like `x`) and `absmax`.

    A block holding NaN or Inf gets a non-finite absmax and its codes are left unwritten;
    the caller checks `absmax` and raises. An all-zero block gets absmax 0 and the code of
    the scaled value 0 (it divides by 1 instead of 0).
    """
    n = x.size
    for b in prange(absmax.size):
        start = b * block_size
        stop = min(start + block_size, n)
        absmax[b], scale = _block_divisor(x, start, stop)
        if not np.isfinite(absmax[b]):
            continue
        for i in range(np.uint64(start), np.uint64(stop)):
            codes[i] = quantize_scaled(x[i] / scale, table, shift, lo, nb)


@njit(inline="always", error_model="numpy")
def requant_group(x, x_at, o, scale, inverse, codes, codes_at, e, zero, decades, table, shift, lo,
                  nb, nonneg):  # fmt: skip
    """Codes of the 64 values ``x[o:o + 64] / scale`` into ``codes[e:e + 64]`` (AVX-512 VBMI).

    :func:`~._numba_simd.requant64` (``requant64_nonneg`` if `nonneg`: all ``x >= 0`` with an
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
# compilation take 30 s instead of a few. They take data addresses instead of arrays except
# for the scratch they read or write, which must stay an argument so that the kernel keeps it
# alive up to the call: Numba passes an array as seven machine words, and pushing three of
# them per call cost the step about 3% (profile of the kernel at 1e6 elements).
_BLOCK = {"cache": True, "error_model": "numpy", "nogil": True}


@njit(inline="always", error_model="numpy")
def _view(address, like, n):
    """The ``n`` elements of type ``like`` at ``address``, as an array (no copy, no owner)."""
    return numba.carray(as_pointer(np.uint64(address), like), np.uint64(n))


@njit(inline="always", error_model="numpy")
def _dequantize(codes_at, e, n, planes_at, map_at, scale, out, o):
    out_at = out.ctypes.data
    whole = n & ~np.uint64(63)
    for j in range(np.uint64(0), whole, np.uint64(64)):
        dequant64(codes_at + e + j, planes_at, out_at + np.uint64(4) * (o + j), scale)
    if whole < n:
        codes, qmap = _view(codes_at, np.uint8, e + n), _view(map_at, np.float32, 256)
        for i in range(whole, n):
            out[o + i] = qmap[codes[e + i]] * scale


@njit(inline="always", error_model="numpy")
def _requantize(x, o, n, scale, codes_at, e, zero, decades, quant, nonneg):
    x_at, codes = x.ctypes.data, _view(codes_at, np.uint8, e + n)
    table_at, size, shift, lo, nb = quant
    table = _view(table_at, np.int32, size)
    inverse = np.float32(1) / scale
    whole = n & ~np.uint64(63)
    for j in range(np.uint64(0), whole, np.uint64(64)):
        requant_group(x, x_at, o + j, scale, inverse, codes, codes_at, e + j, zero, decades,
                      table, shift, lo, nb, nonneg)  # fmt: skip
    for i in range(whole, n):
        codes[e + i] = quantize_scaled(x[o + i] / scale, table, shift, lo, nb)


@njit(**_BLOCK)
def dequantize_into(codes_at, e, n, planes_at, map_at, scale, out, o):
    """``out[o:o + n] = map[codes[e:e + n]] * scale`` by in-register lookups (AVX-512 VBMI).

    :func:`~._numba_simd.dequant64` for each 64 codes, a plain loop for the last ``n % 64``.
    ``codes_at``, ``planes_at`` and ``map_at`` are the data addresses of the codes (uint8),
    the map's byte planes and the map (256 float32); offsets and ``n`` are uint64.
    """
    _dequantize(codes_at, e, n, planes_at, map_at, scale, out, o)


@njit(**_BLOCK)
def requantize_into(x, o, n, scale, codes_at, e, zero, decades, quant, nonneg):
    """``codes[e:e + n]`` = the codes of ``x[o:o + n] / scale`` (AVX-512 VBMI).

    :func:`requant_group` for each 64 values, the exact table lookup for the last ``n % 64``;
    `nonneg` as there. ``codes_at`` is the data address of the codes (uint8), ``quant =
    (address, size, shift, lo, nb)`` the exact quantizer's table and parameters
    (:func:`~._q8_elem.build_quant_tables`). Offsets and ``n`` are uint64.
    """
    _requantize(x, o, n, scale, codes_at, e, zero, decades, quant, nonneg)


@njit(**_BLOCK)
def turn_over(sm, sv, prv, bs, redo, scales, cur, n, scales_now, e, codes_at, zeros, decades,
              quants, planes, maps_at):  # fmt: skip
    """One call per block of the 8-bit step for both moments: finish one block, open the next.

    First :func:`requantize_into` the previous block (``bs`` values at ``x[prv:]``, codes from
    ``e - bs``) where ``redo = (m?, v?)`` with its divisors ``scales``, then
    :func:`dequantize_into` the ``n`` codes from ``e`` (none when ``n`` is 0) to ``x[cur:]``
    with the absmax ``scales_now``; ``x`` is ``sm`` for m (signed map) and ``sv`` for v. The
    other arguments are pairs (m, v) of the arguments of those functions. One call instead of
    four: each call pushes its arguments and saves registers.
    """
    if redo[0]:
        _requantize(sm, prv, bs, scales[0], codes_at[0], e - bs, zeros[0], decades[0],
                    quants[0], False)  # fmt: skip
    if redo[1]:
        _requantize(sv, prv, bs, scales[1], codes_at[1], e - bs, zeros[1], decades[1],
                    quants[1], True)  # fmt: skip
    if n:
        _dequantize(codes_at[0], e, n, planes[0], maps_at[0], scales_now[0], sm, cur)
        _dequantize(codes_at[1], e, n, planes[1], maps_at[1], scales_now[1], sv, cur)


@njit(**_BLOCK)
def stochastic_into(x, o, n, scale, codes_at, e, planes_at, map_at, key, t):
    """:func:`round_stochastic` with in-register lookups (AVX-512 VBMI).

    Arguments as in :func:`requantize_into`; ``planes_at`` holds the addresses of the byte
    planes of the map and of its two :func:`~._stochastic.gap_tables`, ``map_at`` that of the
    map. :func:`~._numba_simd.dequant64` looks up all three for 64 codes at a time into
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


@njit(**_KERNEL)
def quantize_blockwise_simd(x, block_size, table, shift, lo, nb, codes, absmax, binades, lines,
                            zero):  # fmt: skip
    """`quantize_blockwise` with the decade arithmetic of :func:`requant_group` (AVX-512 VBMI).

    ``binades``, ``lines`` and ``zero`` are the map's ``DecadeTables``; the codes are the same.
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
        for o in range(start, whole, np.uint64(64)):  # inlined here: a call per block costs 30%
            requant_group(x, x_at, o, scale, inverse, codes, codes_at, o, zero, decades, table,
                          shift, lo, nb, False)  # fmt: skip
        for i in range(whole, stop):
            codes[i] = quantize_scaled(x[i] / scale, table, shift, lo, nb)


@njit(**_KERNEL)
def dequantize_blockwise(codes, absmax, block_size, qmap, out):
    """Write ``qmap[codes] * absmax[block]`` (float32) into the 1-D array `out`."""
    n = codes.size
    for b in prange(absmax.size):
        start = b * block_size
        stop = min(start + block_size, n)
        scale = absmax[b]
        for i in range(np.uint64(start), np.uint64(stop)):
            out[i] = qmap[codes[i]] * scale


@njit(**_KERNEL)
def quantize_bits_array(bits, table, shift, lo, nb, codes):
    """`quantize_bits` over a 1-D int32 array of bit patterns (for tests and sweeps)."""
    for i in prange(bits.size):
        codes[i] = quantize_bits(bits[i], table, shift, lo, nb)
