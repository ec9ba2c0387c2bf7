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
from numba import njit, prange

from adamnp.backends import _q8_elem

_KERNEL = {"parallel": True, "cache": True, "fastmath": False, "error_model": "numpy"}

quantize_bits = njit(inline="always", error_model="numpy")(_q8_elem.quantize_bits)


@njit(inline="always", error_model="numpy")
def quantize_scaled(s, table, shift, lo, nb):
    """The code of the float32 scaled value `s`: `quantize_bits` of its bit pattern."""
    return quantize_bits(np.float32(s).view(np.int32), table, shift, lo, nb)


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
        amax = 0  # an integer max over the bits of |x| vectorizes, a float max does not
        for i in range(np.uint64(start), np.uint64(stop)):
            amax = max(amax, np.float32(x[i]).view(np.int32) & 0x7FFFFFFF)
        scale = np.int32(amax).view(np.float32)
        absmax[b] = scale
        if amax >= 0x7F800000:
            continue
        if amax == 0:
            scale = np.float32(1.0)
        for i in range(np.uint64(start), np.uint64(stop)):
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
