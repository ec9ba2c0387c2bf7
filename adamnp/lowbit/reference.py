"""The 8-bit format's NumPy reference: quantize, dequantize, requantize, stochastic rounding.

These functions define the format's rounding; every compiled kernel reproduces them bit for
bit. ``x / absmax`` is a correctly rounded float32 division and the code is the index of the
nearest map value, ties to the lower index (:func:`nearest_code`, via float64 midpoints). A
block whose absmax is 0 stores absmax 0 and the code of 0.0. All functions take flat arrays
and write into preallocated outputs; none checks its inputs (the callers do).
"""

from __future__ import annotations

import numpy as np

from .stochastic import block_key, gap_tables, uniform

BLOCK_SIZES = "a power of two in 64..4096"


def n_blocks(n: int, block_size: int) -> int:
    """Number of blocks of ``block_size`` covering ``n`` elements (the last may be partial).

    Examples
    --------
    >>> n_blocks(257, 256), n_blocks(0, 256)
    (2, 0)
    """
    return -(-n // block_size)


def is_block_size(block_size) -> bool:
    """Whether ``block_size`` is an int (not a bool) and a power of two in 64..4096.

    Examples
    --------
    >>> is_block_size(256), is_block_size(100), is_block_size(True)
    (True, False, False)
    """
    return (
        not isinstance(block_size, bool)
        and isinstance(block_size, (int, np.integer))
        and 64 <= block_size <= 4096
        and block_size & (block_size - 1) == 0
    )


def nearest_code(scaled, code):
    """Reference rounding: nearest map value, ties to the lower index (float64 midpoints).

    Examples
    --------
    >>> code = np.linspace(-1, 1, 256, dtype=np.float32)
    >>> int(nearest_code(np.float32(0.5), code))
    191
    """
    mids = (code[:-1].astype(np.float64) + code[1:]) / 2
    return np.searchsorted(mids, np.asarray(scaled, dtype=np.float64), side="left")


def quantize_into(flat, code, block_size, codes_out, absmax_out) -> None:
    """Quantize the finite 1-D float32 ``flat`` into ``codes_out`` and ``absmax_out``."""
    nblocks = absmax_out.size
    blocks = np.zeros(nblocks * block_size, dtype=np.float32)
    blocks[: flat.size] = flat  # zero padding changes neither absmax nor the real codes
    blocks = blocks.reshape(nblocks, block_size)
    absmax = np.abs(blocks).max(axis=1, initial=np.float32(0))
    # An all-zero block divides by 1: its scaled values are +-0, whose code is that of 0.0.
    scaled = blocks / np.where(absmax > 0, absmax, np.float32(1))[:, None]
    codes_out[:] = nearest_code(scaled.reshape(-1)[: flat.size], code)
    absmax_out[:] = absmax


def dequantize_into(codes, absmax, code, block_size, out) -> None:
    """Write ``code[codes] * absmax[block]`` (float32) into the 1-D array ``out``."""
    out[:] = code[codes] * np.repeat(absmax, block_size)[: codes.size]


def requantize_into(x, code, zero_code, block_size, codes_out, absmax_out) -> None:
    """Quantize updated moments ``x`` (whole blocks, the last may be partial) in place.

    A block holding NaN or Inf (possible only with ``nonfinite="propagate"``) is stored as
    absmax NaN with every code at ``zero_code``, so it dequantizes to NaN: the non-finite
    value stays visible instead of being rounded into a finite code.
    """
    n = x.size
    nb = absmax_out.size
    full = n // block_size
    ok = np.ones(nb, bool)
    if full:
        ok[:full] = np.isfinite(x[: full * block_size].reshape(full, block_size)).all(axis=1)
    if nb > full:
        ok[full] = np.isfinite(x[full * block_size :]).all()
    if ok.all():
        quantize_into(x, code, block_size, codes_out, absmax_out)
        return
    bad = np.repeat(~ok, block_size)[:n]
    clean = np.where(bad, np.float32(0), x)
    quantize_into(clean, code, block_size, codes_out, absmax_out)
    absmax_out[~ok] = np.nan
    codes_out[bad] = zero_code


def round_stochastic(x, code, block_size, codes, absmax, key, index0) -> None:
    """Stochastic rounding of ``codes`` (the nearest codes of ``x``) in place.

    ``index0`` is the hash index of ``x[0]``: its group's ``index_base`` plus its index in
    the group's buffer; ``key`` the step's :func:`~.stochastic.step_key`. Blocks with a
    non-finite absmax keep their codes.
    """
    n = x.size
    divisor = np.where(absmax > 0, absmax, np.float32(1))
    s = x * np.repeat(np.float32(1) / divisor, block_size)[:n]
    c = codes.astype(np.int32)
    d = s - code[c]
    up, down = gap_tables(code)
    gap = np.where(d >= 0, up[c], down[c])
    index = np.arange(index0, index0 + n, dtype=np.uint64)
    u = uniform(block_key(key, index >> np.uint64(32)), index & np.uint64(0xFFFFFFFF))
    move = (u * gap < np.abs(d)).astype(np.int32)
    finite = np.repeat(np.isfinite(absmax), block_size)[:n]
    codes[finite] = (c + np.where(d >= 0, move, -move))[finite]
