"""Blockwise 8-bit quantization with the dynamic-tree maps (Dettmers et al., 2022).

The format is byte-compatible with bitsandbytes' blockwise state: uint8 codes with the shape
of the input, and one float32 absmax per block of `block_size` consecutive elements of the
flattened (C-order) array; the last block may be partial.

Rounding is defined exactly: ``scaled = x / absmax`` in float32, and the code is the index of
the nearest map value, ties to the lower index, i.e. ``np.searchsorted(mids, scaled,
side="left")`` with ``mids`` the float64 midpoints of consecutive map values (exact for float32
neighbours). A block whose absmax is 0 stores absmax 0 and the code of 0.0.

References
----------
Dettmers, Lewis, Shleifer and Zettlemoyer, "8-bit Optimizers via Block-wise Quantization",
ICLR 2022.
"""

from functools import lru_cache

import numpy as np

from adamnp.backends import _q8_decades, _q8_elem

__all__ = ["dequantize_blockwise", "dynamic_map", "quantize_blockwise"]

_BACKENDS = ("auto", "numpy", "numba")


def _linspace_f32(start, stop, num, fused=True):
    """``torch.linspace(start, stop, num, dtype=torch.float32)`` as PyTorch's CPU kernel does it.

    The kernel computes ``step = (stop - start) / (num - 1)`` in float32, then element ``k`` as
    ``start + step * k`` for ``k < num // 2`` and ``stop - step * (num - 1 - k)`` above. Builds
    with AVX2/AVX-512 kernels (what x86-64 CPUs since 2013 run) contract each product and sum
    into one fused multiply-add, rounded once (`fused`); that is emulated in float64, exact
    here because ``step * k`` has at most 24 + 8 significant bits and the sum spans fewer than
    53. PyTorch's non-vectorized "default" kernel rounds twice (``fused=False``) and differs
    in the last bit of some values; bitsandbytes' maps are taken from the vectorized one.
    """
    start, stop = np.float32(start), np.float32(stop)
    step = (stop - start) / np.float32(num - 1)
    k = np.arange(num)
    if fused:
        up = (np.float64(start) + np.float64(step) * k).astype(np.float32)
        down = (np.float64(stop) - np.float64(step) * (num - 1 - k)).astype(np.float32)
    else:
        up = start + step * k.astype(np.float32)
        down = stop - step * (num - 1 - k).astype(np.float32)
    return np.where(k < num // 2, up, down)


def _dynamic_map_values(signed, fused=True):
    parts = [np.array([0.0, 1.0], dtype=np.float32)]
    for i in range(7):
        n = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = _linspace_f32(0.1, 1.0, n, fused)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scaled = np.float32(10.0 ** (i - 6)) * means
        parts += [scaled, -scaled] if signed else [scaled]
    return np.sort(np.concatenate(parts))


@lru_cache(maxsize=2)
def dynamic_map(signed=True):
    """The dynamic-tree quantization map of bitsandbytes (``create_dynamic_map``).

    Parameters
    ----------
    signed : bool, default True
        True: the map for signed values (Adam's first moment), in [-0.99297, 1].
        False: the map for non-negative values (the second moment), in [0, 1].

    Returns
    -------
    ndarray
        256 float32 values, strictly increasing, containing 0 and 1; read-only and cached.

    Notes
    -----
    The values equal bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7,
    total_bits=8)`` bit for bit. For decade ``i`` in 0..6 it takes ``n = 2**i + 1`` (signed)
    or ``2**(i + 1) + 1`` (unsigned) float32 points ``linspace(0.1, 1, n)``, their float32
    midpoints, scaled by the float32 ``10**(i - 6)`` (and their negatives if signed), then adds
    0 and 1 and sorts: a linear grid within each decade, seven decades from about 1e-7 to 1.

    The float32 linspace values follow PyTorch's vectorized (AVX2/AVX-512) CPU kernel, which
    fuses multiply and add; PyTorch's non-vectorized kernel would give 42 (signed) and 31
    (unsigned) values that differ by 1 or 2 units in the last place.

    Examples
    --------
    >>> m = dynamic_map(signed=True)
    >>> m.shape, m.dtype
    ((256,), dtype('float32'))
    >>> m[[0, 127, 128, 255]]
    array([-9.9296874e-01,  0.0000000e+00,  5.5000004e-07,  1.0000000e+00],
          dtype=float32)
    >>> dynamic_map(signed=False)[:3]
    array([0.0000000e+00, 3.2500003e-07, 7.7499999e-07], dtype=float32)
    """
    out = _dynamic_map_values(bool(signed))
    out.flags.writeable = False
    return out


def _check_map(code):
    """Return the map as a float32 array after checking it (256 increasing finite values)."""
    if code is None:
        return dynamic_map(True)
    code = np.asarray(code)
    if code.dtype != np.float32:
        raise TypeError(f"code must be float32, got {code.dtype}")
    if code.shape != (256,):
        raise ValueError(f"code must have shape (256,), got {code.shape}")
    if not (np.all(np.isfinite(code)) and np.all(code[1:] > code[:-1])):
        raise ValueError("code must hold 256 finite, strictly increasing values")
    return code


def _check_block_size(block_size):
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if not (64 <= block_size <= 4096 and block_size & (block_size - 1) == 0):
        raise ValueError(f"block_size must be a power of two in 64..4096, got {block_size}")
    return int(block_size)


def _num_blocks(n, block_size):
    return -(-n // block_size)


def _nearest_code(scaled, code):
    """Reference rounding: nearest map value, ties to the lower index (float64 midpoints)."""
    mids = (code[:-1].astype(np.float64) + code[1:]) / 2
    return np.searchsorted(mids, np.asarray(scaled, dtype=np.float64), side="left")


def _quantize_numpy(flat, code, block_size, codes_out, absmax_out):
    nblocks = absmax_out.size
    blocks = np.zeros(nblocks * block_size, dtype=np.float32)
    blocks[: flat.size] = flat  # zero padding changes neither absmax nor the real codes
    blocks = blocks.reshape(nblocks, block_size)
    absmax = np.abs(blocks).max(axis=1, initial=np.float32(0))
    # An all-zero block divides by 1: its scaled values are +-0, whose code is that of 0.0.
    scaled = blocks / np.where(absmax > 0, absmax, np.float32(1))[:, None]
    codes_out[:] = _nearest_code(scaled.reshape(-1)[: flat.size], code)
    absmax_out[:] = absmax


def _dequantize_numpy(codes, absmax, code, block_size, out):
    out[:] = code[codes] * np.repeat(absmax, block_size)[: codes.size]


def _numba_module(backend):
    """The Numba kernels module, or None for the NumPy reference."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "numpy":
        return None
    try:
        from adamnp.backends import _quant_numba
    except ImportError:
        if backend == "numba":
            raise
        return None
    return _quant_numba


def _quantize_into(flat, code, block_size, codes_out, absmax_out, backend="auto"):
    """Quantize a 1-D float32 array into preallocated outputs (no checks on the inputs).

    `codes_out` is a uint8 array of ``flat.size``, `absmax_out` float32 of
    ``ceil(flat.size / block_size)``. Raises ValueError on NaN or Inf, possibly after writing
    part of the outputs.
    """
    kernels = _numba_module(backend)
    tables = None
    if kernels is not None:
        try:
            tables = _q8_elem.build_quant_tables(code)
        except ValueError:
            if backend == "numba":
                raise
    if tables is None:
        if not np.all(np.isfinite(flat)):
            raise ValueError("x contains NaN or Inf; it cannot be quantized")
        _quantize_numpy(flat, code, block_size, codes_out, absmax_out)
        return
    args = (flat, block_size, tables.table, tables.shift, tables.lo, tables.nb)
    decades = _q8_decades.build_decade_tables(code) if kernels.HAVE_VBMI else None
    if decades is None:
        kernels.quantize_blockwise(*args, codes_out, absmax_out)
    else:  # AVX-512 VBMI: the same codes by decade arithmetic
        kernels.quantize_blockwise_simd(*args, codes_out, absmax_out, *decades)
    if not np.all(np.isfinite(absmax_out)):
        raise ValueError("x contains NaN or Inf; it cannot be quantized")


def _dequantize_into(codes, absmax, code, block_size, out, backend="auto"):
    """Dequantize 1-D uint8 `codes` into the preallocated float32 array `out` (no checks)."""
    kernels = _numba_module(backend)
    if kernels is None:
        _dequantize_numpy(codes, absmax, code, block_size, out)
    else:
        kernels.dequantize_blockwise(codes, absmax, block_size, code, out)


def quantize_blockwise(x, code=None, block_size=256, *, backend="auto"):
    """Quantize a float32 array to 8-bit codes with one absmax per block.

    Parameters
    ----------
    x : ndarray of float32
        Any shape. Only float32 is accepted (convert with ``x.astype(np.float32)``).
    code : ndarray of float32, shape (256,), optional
        The map, strictly increasing; default ``dynamic_map(signed=True)``.
    block_size : int, default 256
        A power of two in 64..4096; blocks are runs of the flattened (C-order) array.
    backend : {"auto", "numpy", "numba"}, default "auto"
        "auto" uses Numba when it imports; all backends give identical results.

    Returns
    -------
    codes : ndarray of uint8
        Same shape as `x`.
    absmax : ndarray of float32
        Shape ``(ceil(x.size / block_size),)``: ``max |x|`` of each block.

    Raises
    ------
    TypeError
        If `x` or `code` is not float32.
    ValueError
        If `x` holds NaN or Inf, or `code` or `block_size` is invalid.

    See Also
    --------
    dequantize_blockwise : the inverse, ``code[codes] * absmax``.

    Notes
    -----
    ``scaled = x / absmax`` is a correctly rounded float32 division, and its code is the index
    of the nearest map value, ties to the lower index (nearest in exact arithmetic, via float64
    midpoints). So the round trip error of an element is at most half the gap between the two
    map values around ``scaled``, times absmax, plus float32 rounding.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([0.5, -1.0, 0.0, 0.25], dtype=np.float32)
    >>> codes, absmax = quantize_blockwise(x, block_size=64)
    >>> codes
    array([219,   0, 127, 201], dtype=uint8)
    >>> absmax
    array([1.], dtype=float32)
    >>> dequantize_blockwise(codes, absmax, block_size=64)
    array([ 0.50078124, -0.99296874,  0.        ,  0.24765624], dtype=float32)
    """
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"x must be float32, got {x.dtype}; convert with x.astype(np.float32)")
    code = _check_map(code)
    block_size = _check_block_size(block_size)
    codes = np.empty(x.shape, dtype=np.uint8)
    absmax = np.empty(_num_blocks(x.size, block_size), dtype=np.float32)
    flat = np.ascontiguousarray(x).reshape(-1)
    _quantize_into(flat, code, block_size, codes.reshape(-1), absmax, backend)
    return codes, absmax


def dequantize_blockwise(codes, absmax, code=None, block_size=256, *, backend="auto"):
    """Map 8-bit codes back to float32: ``code[codes] * absmax[block]``.

    Parameters
    ----------
    codes : ndarray of uint8
        Any shape, as returned by `quantize_blockwise`.
    absmax : ndarray of float32
        Shape ``(ceil(codes.size / block_size),)``, finite and non-negative.
    code : ndarray of float32, shape (256,), optional
        The map used to quantize; default ``dynamic_map(signed=True)``.
    block_size : int, default 256
        The block size used to quantize.
    backend : {"auto", "numpy", "numba"}, default "auto"
        "auto" uses Numba when it imports; all backends give identical results.

    Returns
    -------
    ndarray of float32
        Same shape as `codes`; each element is one float32 product.

    Examples
    --------
    >>> import numpy as np
    >>> codes = np.array([219, 0, 127, 201], dtype=np.uint8)
    >>> dequantize_blockwise(codes, np.array([2.0], np.float32), block_size=64)
    array([ 1.0015625 , -1.9859375 ,  0.        ,  0.49531248], dtype=float32)
    """
    codes, absmax = np.asarray(codes), np.asarray(absmax)
    if codes.dtype != np.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if absmax.dtype != np.float32:
        raise TypeError(f"absmax must be float32, got {absmax.dtype}")
    code = _check_map(code)
    block_size = _check_block_size(block_size)
    nblocks = _num_blocks(codes.size, block_size)
    if absmax.shape != (nblocks,):
        raise ValueError(
            f"absmax must have shape ({nblocks},) for {codes.size} codes in blocks of "
            f"{block_size}, got {absmax.shape}"
        )
    if not np.all(np.isfinite(absmax) & (absmax >= 0)):
        raise ValueError("absmax must be finite and non-negative")
    out = np.empty(codes.shape, dtype=np.float32)
    flat = np.ascontiguousarray(codes).reshape(-1)
    _dequantize_into(flat, absmax, code, block_size, out.reshape(-1), backend)
    return out
