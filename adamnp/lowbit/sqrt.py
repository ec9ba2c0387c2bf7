"""The ``"sqrt"`` 8-bit state format: ``sqrt(v)`` on an 8-bit float, ``m`` as its ratio to it.

Why (measured in docs/eight_bit.md): with bitsandbytes' format a gradient small against the
largest of its block rounds ``v`` (which scales as the gradient squared) to zero or far
below its value and the step ``m / sqrt(v)`` explodes. This format keeps the step of every
element within a few percent of float32's, whatever the block holds:

* the second moment is stored as ``s = sqrt(v)``, whose range is the gradient's, not its
  square's, on a map **without zero**: 256 codes, the float32 values with bit patterns
  ``S_BASE + c * 2**20`` (an unsigned float with 5 exponent and 3 mantissa bits, 32 binades
  from ``2**-32 * 1.125`` to 1) times the block's largest ``s``. A value below the map is
  stored as its smallest value: ``v`` is never rounded to zero, only up;
* the first moment is stored as ``r = m / s`` (``s`` of the same step, unquantized; 0 where
  ``s`` is 0): the ratio the step is made of, bounded by about ``(1 - b1) / sqrt(1 - b2)``
  times a small factor, as 255 levels ``q / 127`` (``q`` in -127..127, a signed byte) times
  the block's largest ``|r|``. The stored moment is ``m = r * s`` with both quantized, so the
  next step's ratio is the stored ``r`` however ``s`` was rounded;
* both are rounded **stochastically** (unbiased), from one 32-bit counter hash per element
  (:mod:`.stochastic`): nearest rounding would freeze ``v`` (it moves 0.1% per step, its
  codes are 9-12% apart) and a decaying ``m``.

Definition (float32 and int32/uint32 operations, the same on every backend). Per block, with
the updated float32 moments ``m``, ``v`` (and amsgrad's ``vmax``):

1. ``s = sqrt(v)``; ``r = m / s`` where ``s > 0``, else 0; amsgrad: ``x = sqrt(vmax)``.
2. ``S = max(s)``, ``R = max(|r|)`` (``X = max(x)``) over the block; each is the block's
   absmax. A block with NaN or Inf in one of them stores absmax NaN and code 0 for that
   moment (it decodes to NaN). A block whose absmax is 0 divides by 1 below.
3. ``h = mix32(index_low ^ block_key(key, index_high))`` for the element's index in its
   group's buffer, ``key`` the step's :func:`~.stochastic.step_key`.
4. ``codes_v = s_code(bits(s / S), h)`` (:func:`s_code`); ``codes_m = r_code((r / R) * 127,
   h)`` (:func:`r_code`) as a two's-complement byte; amsgrad: ``codes_vmax`` like ``codes_v``
   from ``x / X``.

Decoding: ``s = s_value(code) * S``, ``v = s * s``; ``r = float32(q) * (R / 127)``, ``m = r *
s``; ``vmax = (s_value(code) * X)**2``. Memory: as bitsandbytes' format, two bytes per
element and two float32 per block.

The scalar functions below are plain Python on ``np.int32``/``np.uint32``/``np.float32``
scalars, compiled as they are by Numba for the CPU and CUDA kernels, and applied to arrays by
the NumPy reference (:func:`requantize_into`, :func:`dequantize_into`).
"""

from __future__ import annotations

import numpy as np

from .stochastic import block_key, mix32

S_SHIFT = 20  # 3 mantissa bits: a code step is 2**20 float32 patterns
S_BASE = 0x3F800000 - (255 << S_SHIFT)  # pattern of code 0: 2**-32 * 1.125
_HIGH_SIGN = 0x7FFFFFFF
_R_LEVELS = 127
_U_R_BITS = 12  # low hash bits of the ratio's rounding; the top 20 round s


def s_code(bits, h):
    """The code of a scaled root ``s / S`` from its float32 bit pattern ``bits`` (int32).

    Stochastic: with ``a = (bits & 0x7FFFFFFF) - S_BASE``, the code is ``(a + (h >> 12)) >>
    20`` clamped to 0..255: the upper of the two map values around the value with probability
    its distance from the lower over their gap (the map is linear between neighbouring
    codes, so this is exact in value). A value below the map (0 included) gets code 0, the
    map's smallest value: rounded up, never to zero.

    Examples
    --------
    >>> one = int(np.float32(1.0).view(np.int32))
    >>> int(s_code(one, np.uint32(0xFFFFFFFF))), int(s_code(0, np.uint32(0)))
    (255, 0)
    """
    a = np.int32(np.int32(bits) & np.int32(_HIGH_SIGN)) - np.int32(S_BASE)
    c = np.int32(a + np.int32(np.uint32(h) >> np.uint32(32 - S_SHIFT))) >> np.int32(S_SHIFT)
    return np.int32(min(max(c, np.int32(0)), np.int32(255)))


def s_bits(code):
    """The float32 bit pattern (int32) of map value ``code`` of ``s``.

    Examples
    --------
    >>> np.int32(s_bits(255)).view(np.float32), np.int32(s_bits(0)).view(np.float32)
    (np.float32(1.0), np.float32(2.6193447e-10))
    """
    return np.int32(np.int32(S_BASE) + (np.int32(code) << np.int32(S_SHIFT)))


def r_code(t, h):
    """The signed code (-127..127) of a scaled ratio ``t = (r / R) * 127`` in [-127, 127].

    Stochastic: ``int32((t + u) + 128) - 128`` (float32 adds, truncation) with ``u =
    float32(h & 0xFFF) * 2**-12``, a uniform in [0, 1): ``floor(t)`` or ``floor(t) + 1``,
    the latter with probability ``t - floor(t)`` (to 12 bits).

    Examples
    --------
    >>> int(r_code(np.float32(-127), np.uint32(0xFFFFFFFF))), int(r_code(np.float32(0.5), 0))
    (-127, 0)
    """
    u = np.float32(np.uint32(h) & np.uint32(0xFFF)) * np.float32(2.0**-_U_R_BITS)
    q = np.int32(np.float32(np.float32(t) + u) + np.float32(128)) - np.int32(128)
    return np.int32(min(max(q, np.int32(-_R_LEVELS)), np.int32(_R_LEVELS)))


def s_map() -> np.ndarray:
    """The 256 values of the map of ``s`` (float32, increasing, no zero).

    Examples
    --------
    >>> m = s_map()
    >>> float(m[0]), float(m[-2]), float(m[-1])
    (2.6193447411060333e-10, 0.9375, 1.0)
    """
    return (S_BASE + (np.arange(256, dtype=np.int32) << S_SHIFT)).view(np.float32)


# -- the NumPy reference (whole blocks; the last may be partial)


def _block_max(x, block_size, nblocks):
    pad = np.zeros(nblocks * block_size, np.float32)
    pad[: x.size] = np.abs(x)
    return pad.reshape(nblocks, block_size).max(axis=1)  # NaN propagates


def _hashes(key, index0, n):
    index = np.arange(index0, index0 + n, dtype=np.uint64)
    bkey = block_key(np.uint32(key), (index >> np.uint64(32)).astype(np.uint32))
    return mix32((index & np.uint64(0xFFFFFFFF)).astype(np.uint32) ^ bkey)


def _encode(y, amax, block_size, codes_out, absmax_out, code_of):
    """Codes of ``y`` (the scaled values ``y / amax`` through ``code_of``) and the absmax."""
    n = y.size
    ok = np.isfinite(amax)
    each = np.repeat(amax, block_size)[:n]
    divisor = np.where(each > 0, each, np.float32(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        codes = code_of(y / divisor)
    bad = np.repeat(~ok, block_size)[:n]
    codes_out[:] = np.where(bad, 0, codes).astype(np.int8).view(np.uint8)
    absmax_out[:] = np.where(ok, amax, np.float32(np.nan))


def requantize_into(m, v, vmax, codes, absmax, block_size, key, index0) -> None:
    """Store the updated float32 moments ``m``, ``v`` (and ``vmax``, or None) of whole blocks.

    ``codes`` and ``absmax`` map ``"m"``, ``"v"`` (and ``"vmax"``) to the output slices;
    ``index0`` is the index of the first element in its group's buffer, ``key`` the step's
    hash key. The definition is the module's.
    """
    n = m.size
    nb = -(-n // block_size)
    s = np.sqrt(v)
    r = np.zeros(n, np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.divide(m, s, out=r, where=s > 0)
    h = _hashes(key, index0, n)

    def s_codes(scaled):
        bits = scaled.view(np.int32) & np.int32(_HIGH_SIGN)
        c = (bits - np.int32(S_BASE) + (h >> np.uint32(32 - S_SHIFT)).astype(np.int32)) >> 20
        return np.clip(c, 0, 255)

    def r_codes(scaled):
        t = scaled * np.float32(_R_LEVELS)
        u = (h & np.uint32(0xFFF)).astype(np.float32) * np.float32(2.0**-_U_R_BITS)
        q = ((t + u) + np.float32(128)).astype(np.int32) - 128
        return np.clip(q, -_R_LEVELS, _R_LEVELS)

    with np.errstate(invalid="ignore"):
        _encode(s, _block_max(s, block_size, nb), block_size, codes["v"], absmax["v"], s_codes)
        _encode(r, _block_max(r, block_size, nb), block_size, codes["m"], absmax["m"], r_codes)
        if vmax is not None:
            x = np.sqrt(vmax)
            _encode(x, _block_max(x, block_size, nb), block_size, codes["vmax"], absmax["vmax"],
                    s_codes)  # fmt: skip


def dequantize_into(codes, absmax, block_size, out) -> None:
    """Decode ``out["m"]``, ``out["v"]`` (and ``out["vmax"]``) from the stored codes."""
    n = codes["v"].size
    s = s_map()[codes["v"]] * np.repeat(absmax["v"], block_size)[:n]
    rscale = np.repeat(absmax["m"] / np.float32(_R_LEVELS), block_size)[:n]
    r = codes["m"].view(np.int8).astype(np.float32) * rscale
    np.multiply(s, s, out=out["v"])
    np.multiply(r, s, out=out["m"])
    if "vmax" in out:
        x = s_map()[codes["vmax"]] * np.repeat(absmax["vmax"], block_size)[:n]
        np.multiply(x, x, out=out["vmax"])
