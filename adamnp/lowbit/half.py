"""Half-precision parameters (float16, bfloat16): conversion to and from float32, in bits.

A float16 or bfloat16 parameter is updated in float32 (its value upcast, exactly), and the
result is rounded back to the parameter's format, to nearest (ties to even: what NumPy's
``astype(np.float16)``, ``ml_dtypes`` and torch do) or **stochastically**: up with probability
equal to the distance from the value below, in units of the gap (torchao's
``bf16_stochastic_round``). Stochastic rounding keeps an update smaller than half a gap from
being lost: in expectation every update lands.

Everything is integer arithmetic on bit patterns, written once as plain scalar Python on
``np.uint32``/``np.float32`` values (compiled by Numba for the CPU and CUDA kernels; Numba has
no float16 on the CPU and no bfloat16 anywhere), with NumPy array twins for the reference
(``*_array``), so every backend gives the same bits. Neither needs ``ml_dtypes``: a bfloat16
array is read through a ``uint16`` view of its bits.

Definition (``bits``: the float32's bit pattern, ``a = bits & 0x7FFFFFFF``, ``u``: a 32-bit
random integer, :func:`param_key` and :func:`~.stochastic.mix32` of the element's hash index,
its group's ``index_base`` plus its index in the group's buffers):

* **float16, nearest**: NaN gives the quiet NaN ``0x7E00`` (with the sign); ``a >= 2**16``
  gives Inf; below ``2**-14`` (float16's subnormals) the value is ``float32(|x| + 0.5)``'s
  bits minus those of ``0.5`` (the float32 add rounds to nearest-even at float16's subnormal
  spacing ``2**-24``); otherwise ``(a - (112 << 23) + 0xFFF + odd) >> 13`` with ``odd`` the
  last kept bit.
* **float16, stochastic**: the same NaN and ``>= 2**16`` cases; otherwise ``(a - (112 << 23)
  + (u >> 19)) >> 13`` (13 random bits added below the kept ones); below ``2**-14`` the
  significand with its implicit bit, ``q``, is shifted right by ``k = 126 - exponent`` places
  after adding ``k`` random bits (``k`` capped at 31: a value below ``2**-32`` is first shifted
  by the excess without rounding).
* **bfloat16, nearest**: NaN gives ``0x7FC0`` (with the sign); otherwise ``(bits + 0x7FFF +
  odd) >> 16``.
* **bfloat16, stochastic**: NaN as above; otherwise ``(bits + (u >> 16)) >> 16``.

Values beyond the largest finite number of the format round to Inf (nearest: from half a gap
above it; stochastic: with the probability of rounding up), as the formats define.

Examples
--------
>>> import numpy as np
>>> x = np.float32([1.0, 1.0 + 2.0**-11, 3.14159, -65520.0, 2.0**-20])  # a tie: to even
>>> bits = f16_round_array(x)
>>> with np.errstate(over="ignore"):  # NumPy warns that -65520 overflows to -Inf
...     ref = x.astype(np.float16)
>>> bool(np.array_equal(bits, ref.view(np.uint16)))
True
>>> f16_to_f32_array(bits).tolist()
[1.0, 1.0, 3.140625, -inf, 9.5367431640625e-07]
"""

from __future__ import annotations

import numpy as np

from .stochastic import _mix32_int, step_key

_U32 = np.uint32
_F32 = np.float32

#: Names of the half-precision parameter formats, by their format id in the kernels.
HALF_FORMATS = ("float16", "bfloat16")
#: How a half-precision parameter is rounded after its float32 update.
PARAM_ROUNDINGS = ("nearest", "stochastic")

_PARAM_SALT = 0x5851F42D  # separates the parameters' random stream from the 8-bit state's


def half_format(dtype) -> int:
    """The format id of a parameter dtype: 0 float16, 1 bfloat16, -1 anything else.

    bfloat16 is recognised by name (``ml_dtypes.bfloat16``, the NumPy dtype JAX and
    TensorFlow use), so adamnp needs no import of ``ml_dtypes`` to update such arrays.

    Examples
    --------
    >>> half_format(np.float16), half_format(np.float32)
    (0, -1)
    """
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return 0
    if dtype.name == "bfloat16" and dtype.itemsize == 2:
        return 1
    return -1


def bfloat16_dtype():
    """``np.dtype(ml_dtypes.bfloat16)``, or None when ``ml_dtypes`` is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def typestr_dtype(typestr: str) -> np.dtype:
    """The dtype an array interface's ``typestr`` describes, with a two-byte void (``<V2``,
    ``|V2``: how torch and ``ml_dtypes`` export bfloat16) read as bfloat16 when ``ml_dtypes``
    is installed.

    Examples
    --------
    >>> typestr_dtype("<f2")
    dtype('float16')
    >>> typestr_dtype("<V2") == (bfloat16_dtype() or np.dtype("V2"))
    True
    """
    dtype = np.dtype(typestr)
    if dtype.kind == "V" and dtype.itemsize == 2 and not dtype.names:
        bf16 = bfloat16_dtype()
        return dtype if bf16 is None else bf16
    return dtype


def param_key(step: int, group_tag: int) -> int:
    """The hash key of the stochastic parameter rounding of step ``step`` (1-based) of the
    group whose first leaf is ``group_tag``: independent of the 8-bit state's stream.

    Examples
    --------
    >>> param_key(1, 0) != param_key(2, 0) != step_key(2, 0)
    True
    """
    return _mix32_int(step_key(step, group_tag) ^ _PARAM_SALT)


# -- scalar functions (compiled by Numba for the CPU and CUDA kernels)


def f16_to_f32(h):
    """The float32 value of float16 bits ``h`` (exact).

    Examples
    --------
    >>> float(f16_to_f32(np.uint32(0x3C00))), float(f16_to_f32(np.uint32(0x0001)))
    (1.0, 5.960464477539063e-08)
    """
    h = _U32(h)
    sign = _U32(_U32(h & _U32(0x8000)) << _U32(16))
    em = _U32(h & _U32(0x7FFF))
    shifted = _U32(em << _U32(13))
    normal = _U32(shifted + _U32(0x38000000))  # exponent + (127 - 15)
    special = _U32(shifted + _U32(0x70000000))  # Inf and NaN: exponent 31 -> 255
    bits = special if em >= _U32(0x7C00) else normal
    sub = _F32(np.int32(em)) * _F32(2.0**-24)  # subnormals and zero: em units of 2**-24
    magnitude = sub if em < _U32(0x400) else _U32(bits).view(_F32)
    return _U32(_U32(_F32(magnitude).view(_U32)) | sign).view(_F32)


def bf16_to_f32(h):
    """The float32 value of bfloat16 bits ``h`` (exact: the top half of a float32).

    Examples
    --------
    >>> float(bf16_to_f32(np.uint32(0x3F80))), float(bf16_to_f32(np.uint32(0xC049)))
    (1.0, -3.140625)
    """
    return _U32(_U32(h) << _U32(16)).view(_F32)


def f16_round(x, u, stochastic):
    """float16 bits (as uint32) of float32 ``x``: to nearest, or stochastically with the
    random 32-bit ``u`` (module docstring).

    Examples
    --------
    >>> hex(f16_round(np.float32(1.0 + 2.0**-11), np.uint32(0), False))  # a tie: to even
    '0x3c00'
    >>> hex(f16_round(np.float32(1.0 + 2.0**-11), np.uint32(2**31), True))  # u >= 1/2: up
    '0x3c01'
    """
    bits = _U32(_F32(x).view(_U32))
    sign = _U32(_U32(bits >> _U32(16)) & _U32(0x8000))
    a = _U32(bits & _U32(0x7FFFFFFF))
    big = _U32(0x7E00) if a > _U32(0x7F800000) else _U32(0x7C00)
    # Each branch is computed for every value and the right one picked at the end (no branch
    # in the kernels); clamping keeps the unused ones from wrapping around.
    an = max(a, _U32(0x38800000))  # a, where the normal-range result is used
    if stochastic:
        norm = _U32(_U32(an - _U32(0x38000000) + _U32(u >> _U32(19))) >> _U32(13))
        e = _U32(a >> _U32(23))
        implicit = _U32(0x800000) if e > _U32(0) else _U32(0)
        q = _U32(_U32(a & _U32(0x7FFFFF)) | implicit)
        k = _U32(_U32(126) - min(max(e, _U32(1)), _U32(125)))  # 14 .. 125 below 2**-14
        k1 = min(k, _U32(31))
        k0 = min(_U32(k - k1), _U32(31))
        sub = _U32(_U32(_U32(q >> k0) + _U32(u >> _U32(_U32(32) - k1))) >> k1)
    else:
        odd = _U32(_U32(a >> _U32(13)) & _U32(1))
        norm = _U32(_U32(an - _U32(0x38000000) + _U32(0xFFF) + odd) >> _U32(13))
        rounded = _F32(_U32(min(a, _U32(0x38800000))).view(_F32) + _F32(0.5))
        sub = _U32(_U32(rounded.view(_U32)) - _U32(0x3F000000))
    low = sub if a < _U32(0x38800000) else norm
    return _U32((big if a >= _U32(0x47800000) else low) | sign)


def bf16_round(x, u, stochastic):
    """bfloat16 bits (as uint32) of float32 ``x``: to nearest, or stochastically with the
    random 32-bit ``u`` (module docstring).

    Examples
    --------
    >>> hex(bf16_round(np.float32(1.0 + 2.0**-8), np.uint32(0), False))  # a tie: to even
    '0x3f80'
    >>> hex(bf16_round(np.float32(np.nan), np.uint32(7), True))
    '0x7fc0'
    """
    bits = _U32(_F32(x).view(_U32))
    nan = _U32(_U32(_U32(bits >> _U32(16)) & _U32(0x8000)) | _U32(0x7FC0))
    if stochastic:
        add = _U32(u >> _U32(16))
    else:
        add = _U32(_U32(0x7FFF) + _U32(_U32(bits >> _U32(16)) & _U32(1)))
    rounded = _U32(_U32(bits + add) >> _U32(16))
    return nan if _U32(bits & _U32(0x7FFFFFFF)) > _U32(0x7F800000) else rounded


def to_f32(h, fmt):
    """The float32 value of half bits ``h`` in format ``fmt`` (0 float16, 1 bfloat16)."""
    return bf16_to_f32(h) if fmt == 1 else f16_to_f32(h)


def round_half(x, u, fmt, stochastic):
    """The half bits (uint16) of float32 ``x`` in format ``fmt`` (0 float16, 1 bfloat16)."""
    bits = bf16_round(x, u, stochastic) if fmt == 1 else f16_round(x, u, stochastic)
    return np.uint16(bits)


# -- the NumPy twins (the reference backend; equal to the scalar functions bit for bit)


def f16_to_f32_array(h) -> np.ndarray:
    """:func:`f16_to_f32` of an array of float16 bits (uint16), vectorized."""
    h = np.asarray(h).astype(np.uint32)
    sign = (h & 0x8000) << 16
    em = h & 0x7FFF
    bits = np.where(em >= 0x7C00, (em << 13) + 0x70000000, (em << 13) + 0x38000000)
    sub = em.astype(np.int32).astype(np.float32) * _F32(2.0**-24)
    magnitude = np.where(em < 0x400, sub, bits.astype(np.uint32).view(np.float32))
    return (magnitude.view(np.uint32) | sign).astype(np.uint32).view(np.float32)


def bf16_to_f32_array(h) -> np.ndarray:
    """:func:`bf16_to_f32` of an array of bfloat16 bits (uint16), vectorized."""
    return (np.asarray(h).astype(np.uint32) << 16).view(np.float32)


def f16_round_array(x, u=None) -> np.ndarray:
    """:func:`f16_round` of a float32 array (uint16 result); ``u`` None rounds to nearest,
    else it holds each element's random uint32."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    sign = (bits >> 16) & 0x8000
    a = bits & 0x7FFFFFFF
    big = np.where(a > 0x7F800000, 0x7E00, 0x7C00).astype(np.uint32)
    with np.errstate(over="ignore"):  # the normal-range formula wraps where it is not used
        if u is not None:
            u = np.asarray(u, np.uint32)
            norm = (a - _U32(0x38000000) + (u >> 19)) >> 13
            e = a >> 23
            q = (a & 0x7FFFFF) | np.where(e > 0, 0x800000, 0).astype(np.uint32)
            k = _U32(126) - np.maximum(e, _U32(1))
            k1 = np.minimum(k, _U32(31))
            k0 = np.minimum(k - k1, _U32(31))
            sub = ((q >> k0) + (u >> (_U32(32) - k1))) >> k1
        else:
            odd = (a >> 13) & 1
            norm = (a - _U32(0x38000000) + _U32(0xFFF) + odd) >> 13
            low = np.minimum(a, _U32(0x38800000)).view(np.float32) + _F32(0.5)
            sub = low.view(np.uint32) - _U32(0x3F000000)
    out = np.where(a >= 0x47800000, big, np.where(a < 0x38800000, sub, norm))
    return (out | sign).astype(np.uint16)


def bf16_round_array(x, u=None) -> np.ndarray:
    """:func:`bf16_round` of a float32 array (uint16 result); ``u`` as in
    :func:`f16_round_array`."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    nan = ((bits >> 16) & 0x8000) | 0x7FC0
    if u is not None:
        add = np.asarray(u, np.uint32) >> 16
    else:
        add = _U32(0x7FFF) + ((bits >> 16) & 1)
    with np.errstate(over="ignore"):  # NaN patterns may wrap; they take `nan`
        rounded = (bits + add) >> 16
    return np.where((bits & 0x7FFFFFFF) > 0x7F800000, nan, rounded).astype(np.uint16)


def to_f32_array(h, fmt: int) -> np.ndarray:
    """:func:`to_f32` of an array of half bits (uint16)."""
    return bf16_to_f32_array(h) if fmt == 1 else f16_to_f32_array(h)


def round_half_array(x, fmt: int, u=None) -> np.ndarray:
    """:func:`round_half` of a float32 array: uint16 bits, ``u`` None for nearest."""
    return bf16_round_array(x, u) if fmt == 1 else f16_round_array(x, u)
