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

import numpy as np

from .lowbit import reference
from .lowbit.exact import build_quant_tables
from .lowbit.maps import dynamic_map
from .lowbit.reference import is_block_size, n_blocks

__all__ = ["dequantize_blockwise", "dynamic_map", "quantize_blockwise"]

_BACKENDS = ("auto", "numpy", "numba")


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
    if not is_block_size(block_size):
        raise ValueError(f"block_size must be a power of two in 64..4096, got {block_size}")
    return int(block_size)


def _kernels(backend):
    """The Numba backend module (its ``quantize_into`` / ``dequantize_into``), or None for
    the NumPy reference."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "numpy":
        return None
    from . import backends

    if backends.available("numba"):
        return backends.get("numba")
    if backend == "numba":
        raise ImportError(backends.get("numba").availability())
    return None


def _quantize_into(flat, code, block_size, codes_out, absmax_out, backend="auto"):
    """Quantize a 1-D float32 array into preallocated outputs (no checks on the inputs).

    Raises ValueError on NaN or Inf, possibly after writing part of the outputs.
    """
    kernels = _kernels(backend)
    if kernels is not None:
        try:
            build_quant_tables(code)
        except ValueError:  # a map too irregular for the O(1) quantizer: only the reference
            if backend == "numba":
                raise
            kernels = None
    if kernels is not None:
        kernels.quantize_into(flat, code, block_size, codes_out, absmax_out)
        return
    if not np.all(np.isfinite(flat)):
        raise ValueError("x contains NaN or Inf; it cannot be quantized")
    reference.quantize_into(flat, code, block_size, codes_out, absmax_out)


def _dequantize_into(codes, absmax, code, block_size, out, backend="auto"):
    """Dequantize 1-D uint8 `codes` into the preallocated float32 array `out` (no checks)."""
    kernels = _kernels(backend)
    if kernels is None:
        reference.dequantize_into(codes, absmax, code, block_size, out)
    else:
        kernels.dequantize_into(codes, absmax, code, block_size, out)


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
    absmax = np.empty(n_blocks(x.size, block_size), dtype=np.float32)
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
    nblocks = n_blocks(codes.size, block_size)
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
