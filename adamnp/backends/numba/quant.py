"""Numba CPU kernels for blockwise 8-bit quantization.

The kernels take arrays and scalars only and write into preallocated outputs. Blocks are
independent, so ``prange`` runs over blocks and each block is read from memory once: the
absmax pass leaves it in L1 for the quantize pass. Inner loops run over unsigned indices: a
signed index makes Numba emit a negative-index wraparound per access, which stops LLVM from
treating the accesses as contiguous (gathers and scatters instead of plain vector loads).

``cache=True`` keys the on-disk cache on this file only: after editing ``_q8_elem.py`` during
development, delete ``adamnp/backends/__pycache__`` (or touch this file).
"""

import numpy as np
from numba import prange

from ...lowbit import exact, stochastic
from .util import jit

quantize_bits = jit(inline="always")(exact.quantize_bits)
mix32 = jit(inline="always")(stochastic.mix32)
round_up = jit(inline="always")(stochastic.round_up)
_HIGH = np.uint64(32)
_LOW = np.uint64(0xFFFFFFFF)


@jit(inline="always")
def quantize_scaled(s, table, shift, lo, nb):
    """The code of the float32 scaled value `s`: `quantize_bits` of its bit pattern."""
    return quantize_bits(np.float32(s).view(np.int32), table, shift, lo, nb)


@jit(inline="always")
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


@jit(inline="always")
def block_keys(key, e):
    """The hash keys of the element indices from ``e`` on: ``(key0, key1, low)``.

    ``key0`` and ``key1`` are :func:`~adamnp.lowbit.stochastic.block_key` for ``e``'s high 32
    bits and
    the next (a block of at most 4096 elements crosses at most one multiple of 2**32); ``low``
    is ``e``'s low 32 bits. Three scalars: a nested tuple here trips Numba's parfor analysis.
    """
    high = np.uint32(np.uint64(e) >> _HIGH)
    key = np.uint32(key)
    low = np.uint32(np.uint64(e) & _LOW)
    return mix32(key ^ high), mix32(key ^ np.uint32(high + np.uint32(1))), low


@jit(inline="always")
def element_hash(i, key0, key1, low):
    """The 32-bit hash ``mix32(index_low ^ block_key)`` of element ``e + i`` (``key0, key1,
    low`` from :func:`block_keys` of ``e``), in uint32 arithmetic."""
    return index_hash(np.uint32(low + np.uint32(i)), key0, key1, low)


@jit(inline="always")
def index_hash(index, key0, key1, low):
    """:func:`element_hash` of the element whose index has the low 32 bits ``index`` (a
    loop that keeps its own uint32 counter vectorizes it; a truncated 64-bit index was
    assembled lane by lane)."""
    return mix32(index ^ (key0 if index >= low else key1))


@jit(inline="always")
def element_uniform(i, key0, key1, low):
    """:func:`~adamnp.lowbit.stochastic.uniform` of element ``e + i`` (see
    :func:`element_hash`). Written out here because ``_stochastic.uniform`` calls ``mix32`` by
    a module name Numba cannot compile there."""
    h = element_hash(i, key0, key1, low)
    return np.float32(h >> np.uint32(8)) * np.float32(2.0**-24)


@jit(inline="always")
def round_stochastic(x, o, n, scale, codes, e, qmap, key, h):
    """Stochastic rounding of ``codes[e:e + n]``, the nearest codes of ``x[o:o + n] / scale``.

    Element by element (:func:`~adamnp.lowbit.stochastic.round_up`), ``codes[e]`` with the
    hash index ``h`` (the group's ``index_base + e``), the next ones with the indices after
    it; offsets and ``n`` are uint64. The
    gather kernel inlines it and must pass ``qmap`` as a view made from a raw pointer: the map
    array itself, passed a second time inside its parallel loop, cost that loop its
    ``noalias`` and with it all vectorization.
    """
    inverse = np.float32(1) / scale
    key0, key1, low = block_keys(key, h)
    o = np.uint64(o)
    e = np.uint64(e)
    for i in range(np.uint64(0), np.uint64(n)):
        u = element_uniform(i, key0, key1, low)
        codes[e + i] = round_up(x[o + i] * inverse, codes[e + i], qmap, u)


@jit(parallel=True)
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


@jit(parallel=True)
def dequantize_blockwise(codes, absmax, block_size, qmap, out):
    """Write ``qmap[codes] * absmax[block]`` (float32) into the 1-D array `out`."""
    n = codes.size
    for b in prange(absmax.size):
        start = b * block_size
        stop = min(start + block_size, n)
        scale = absmax[b]
        for i in range(np.uint64(start), np.uint64(stop)):
            out[i] = qmap[codes[i]] * scale


@jit(parallel=True)
def quantize_bits_array(bits, table, shift, lo, nb, codes):
    """`quantize_bits` over a 1-D int32 array of bit patterns (for tests and sweeps)."""
    for i in prange(bits.size):
        codes[i] = quantize_bits(bits[i], table, shift, lo, nb)
