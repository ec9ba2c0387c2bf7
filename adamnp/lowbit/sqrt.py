"""The ``"sqrt"`` 8-bit state format: ``sqrt(v)`` on an 8-bit float, ``m`` as its ratio to it.

Why (measured in docs/eight_bit.md): with bitsandbytes' format a gradient small against the
largest of its block rounds ``v`` (which scales as the gradient squared) to zero or far
below its value and the step ``m / sqrt(v)`` explodes. This format keeps the step of every
element within a few percent of float32's, whatever the block holds:

* the second moment is stored as ``s = sqrt(v)``, whose range is the gradient's, not its
  square's, on a map **without zero** (:func:`s_map`) times the block's largest ``s``: 256
  float32 values down from 1, fine near the top and coarser below. The narrow map
  (:data:`S_REGIONS`: 6 mantissa bits over ``[1/2, 1]``, 4 over the next 11.94 binades,
  down to ``1.0625 * 2**-13``) serves a block unless one of its positive ``s`` lies below
  ``2**-13`` of its largest: then the wide map (:data:`WIDE_REGIONS`: 6, then 4 bits over 4
  binades, then 3 over 15.9, down to ``1.125 * 2**-21``), and the block stores its largest
  ``s`` negated. The widths were chosen by measurement (docs/eight_bit.md): the noise
  stochastic rounding leaves in ``v`` grows with the gap and builds up over the steps ``v``
  remembers, and it drives the largest step (3 bits everywhere below ``2**-5``: up to 1.62
  times float32's); too narrow a map holds small elements at its bottom, where they creep.
  A value below the map is stored as its smallest value: ``v`` is never rounded to zero,
  only up;
* the first moment is stored as ``r = m / s`` (``s`` of the same step, unquantized; 0 where
  ``s`` is 0): the ratio the step is made of, bounded by about ``(1 - b1) / sqrt(1 - b2)``
  times a small factor, as 255 levels ``q / 127`` (``q`` in -127..127, a signed byte) times
  the block's largest ``|r|``. The stored moment is ``m = r * s`` with both quantized, so the
  next step's ratio is the stored ``r`` however ``s`` was rounded;
* both are rounded **stochastically**, unbiased in ``s`` and in ``r``, from 32-bit counter
  hashes per element (:mod:`.stochastic`): nearest rounding would freeze ``v`` (it moves
  0.1% per step, far less than a code step) and a decaying ``m``. Unbiased in ``s`` rather
  than in ``v``: see :func:`s_code`. ``r`` draws a new hash every step; ``s`` draws a fixed
  hash of the element plus a phase that moves by ``2**32`` over the golden ratio per step
  (:func:`~.stochastic.root_keys`), so that an element's draws are spread evenly over the
  steps and its slowly moving ``s`` does not random-walk (docs/eight_bit.md).

Definition (float32 and int32/uint32 operations, the same on every backend). Per block, with
the updated float32 moments ``m``, ``v`` (and amsgrad's ``vmax``):

1. ``s = sqrt(v)``; ``r = m / s``, but 0 where ``s`` is 0; amsgrad: ``x = sqrt(vmax)``.
2. ``S = max(s)``, ``R = max(|r|)`` (``X = max(x)``) over the block: the absmax stored for
   ``v`` (and ``vmax``), negated where the block takes the wide map (a positive ``s`` below
   ``S * 2**-13``, float32 product); ``m`` stores ``R`` raised to at least
   :data:`R_FLOOR` (``R = 0`` stays 0), so that ``127 / R`` is finite. A block with NaN or
   Inf in one of them stores absmax NaN and code 0 for that moment (it decodes to NaN).
3. ``h = mix32(index_low ^ block_key(key, index_high))`` for the element's hash index, its
   group's ``index_base`` plus its index in the group's buffer (a shard of a distributed
   state hashes as the unsharded state does), ``key`` the step's
   :func:`~.stochastic.step_key`; ``h_s = (mix32(index_low ^ block_key(offset_key,
   index_high)) + phase) mod 2**32`` with the step's :func:`~.stochastic.root_keys`.
4. Each moment is scaled by one float32 multiplier per block (a multiply per element, not a
   division: measured 6% of the CPU step): ``codes_v = s_code(bits(s * (1 / S)), h_s)``
   (:func:`s_code`, on the block's map); ``codes_m = r_code(r * (127 / R), h)``
   (:func:`r_code`) as a two's-complement byte; amsgrad: ``codes_vmax`` like ``codes_v``
   (the same ``h_s``) from ``x * (1 / X)``. A maximum of 0 makes the divisor 1. The scaled
   values may pass 1 (``s``) or 127 (``r``) by a rounding; the codes are clamped.

Decoding: ``s = s_map(absmax < 0)[code] * |absmax|``, ``v = s * s``; ``r = float32(q) * (R /
127)``, ``m = r * s``; ``vmax`` likewise from its codes and absmax. Memory: as
bitsandbytes' format, two bytes per element and two float32 per block.

The scalar functions below are plain Python on ``np.int32``/``np.uint32``/``np.float32``
scalars, compiled as they are by Numba for the CPU and CUDA kernels, and applied to arrays by
the NumPy reference (:func:`requantize_into`, :func:`dequantize_into`).
"""

from __future__ import annotations

import numpy as np

from .stochastic import element_hashes

#: The narrow map of ``s`` from the top: ``(mantissa bits, binades)`` per region, 255 code
#: steps (12.94 binades, down to ``1.0625 * 2**-13``).
S_REGIONS = ((6, 1), (4, 11.9375))
#: The wide map (20.9 binades, down to ``1.125 * 2**-21``), for blocks whose ``s`` spans more
#: than :data:`WIDE_BELOW` binades.
WIDE_REGIONS = ((6, 1), (4, 4), (3, 15.875))
#: A block stores its ``s`` on the wide map when one of its positive ``s`` is below
#: ``S * 2**-WIDE_BELOW`` (``S`` its largest): the narrow map would hold it at its bottom.
WIDE_BELOW = 13
_ONE = 0x3F800000  # bit pattern of 1.0


def _regions(regions=S_REGIONS):
    """``(first code, first pattern, shift)`` of each region of a map, top first."""
    out, code, pattern = [], 255, _ONE
    for mbits, binades in regions:
        shift = 23 - mbits
        count = int(binades * (1 << mbits))
        code, pattern = code - count, pattern - (count << shift)
        out.append((code, pattern, shift))
    assert code == 0
    return tuple(out)


def _padded(regions):
    """Four regions for the scalar code's select chain; a map with fewer repeats its last
    region (a repeated region's bounds equal its predecessor's, so its selects change
    nothing)."""
    r = _regions(regions)
    return (*r, *[r[-1]] * (4 - len(r)))


(_C0, _L0, _S0), (_C1, _L1, _S1), (_C2, _L2, _S2), (_C3, _L3, _S3) = _padded(S_REGIONS)
(_WC0, _WL0, _WS0), (_WC1, _WL1, _WS1), (_WC2, _WL2, _WS2), (_WC3, _WL3, _WS3) = _padded(
    WIDE_REGIONS
)
_HIGH_SIGN = 0x7FFFFFFF
_FLOOR = _L3 - (1 << _S3)  # one code step below the map: all smaller magnitudes round alike
_W_FLOOR = _WL3 - (1 << _WS3)
#: ``2**-WIDE_BELOW``, the factor of a block's largest ``s`` below which it goes wide
WIDE_FACTOR = 2.0**-WIDE_BELOW
#: The position between two codes in units of 2**-20, compared with the top 20 bits of the
#: element's hash (exact for steps of up to 2**20 patterns: 3 or more mantissa bits)
_T_BITS = 20
_T_MASK = (1 << _T_BITS) - 1
assert max(sh for r in (S_REGIONS, WIDE_REGIONS) for _, _, sh in _regions(r)) <= _T_BITS
_R_LEVELS = 127
#: The smallest scale of ``r`` stored for a block whose ``max(|r|)`` is not 0: ``127 / R``
#: stays finite in float32 (below ``127 / 2**128``) however small the ratios are.
R_FLOOR = 2.0**-120
_U_R_BITS = 12  # low hash bits of the ratio's rounding; the top 20 round s


def s_code(bits, h, wide):
    """The code of a scaled root ``x = s / S`` in [0, 1] from its float32 bits (int32), on
    the wide map if ``wide`` (a bool), else the narrow one.

    Stochastic and unbiased in ``s``: between the two map values ``lo <= x < hi`` around it,
    the upper is chosen with probability ``(x - lo) / (hi - lo)``. The stored ``v = s**2`` is
    then a little high on average (by the rounding's variance), and that bias builds up over
    the ``1 / (1 - b2)`` steps ``v`` remembers; it offsets most of the noise the roundings
    leave in ``v``, which makes ``1 / sqrt(v)``, the step, larger on average (Jensen's
    inequality). Measured on the demo problems (docs/eight_bit.md): rounding unbiased in
    ``v`` ended the MLP 0.2-0.6% below float32's loss for every data seed, this rounding
    within 0.34% of it on either side. A value below the map (0 included) gets code 0, the
    map's smallest value: rounded up, never to zero.

    In bits, with ``a = bits & 0x7FFFFFFF`` in the region ``(c0, low, shift)`` of the map
    (:data:`S_REGIONS`, :data:`WIDE_REGIONS`) whose first pattern ``low`` it reaches and ``d
    = (a - low) << (20 - shift)``: the lower code is ``c = c0 + d >> 20``, and ``t = d &
    (2**20 - 1)`` is the position between the two values in units of ``2**-20`` of their
    gap, exactly (values in one binade are linear in their bit patterns). The code moves up
    when ``h >> 12 < t``: the top 20 bits of the hash, a uniform integer below ``2**20``.
    Clamped to 0..255.

    Examples
    --------
    >>> one = int(np.float32(1.0).view(np.int32))
    >>> int(s_code(one, np.uint32(0xFFFFFFFF), False)), int(s_code(0, np.uint32(0), True))
    (255, 0)
    """
    a = np.int32(np.int32(bits) & np.int32(_HIGH_SIGN))
    # The map's constants (block-invariant: a compiler hoists these selects out of a loop).
    l0 = np.int32(_WL0) if wide else np.int32(_L0)
    l1 = np.int32(_WL1) if wide else np.int32(_L1)
    l2 = np.int32(_WL2) if wide else np.int32(_L2)
    l3 = np.int32(_WL3) if wide else np.int32(_L3)
    m0 = np.int32(1 << (_T_BITS - _WS0)) if wide else np.int32(1 << (_T_BITS - _S0))
    m1 = np.int32(1 << (_T_BITS - _WS1)) if wide else np.int32(1 << (_T_BITS - _S1))
    m2 = np.int32(1 << (_T_BITS - _WS2)) if wide else np.int32(1 << (_T_BITS - _S2))
    m3 = np.int32(1 << (_T_BITS - _WS3)) if wide else np.int32(1 << (_T_BITS - _S3))
    k0 = np.int32(_WC0) if wide else np.int32(_C0)
    k1 = np.int32(_WC1) if wide else np.int32(_C1)
    k2 = np.int32(_WC2) if wide else np.int32(_C2)
    k3 = np.int32(_WC3) if wide else np.int32(_C3)
    floor = np.int32(_W_FLOOR) if wide else np.int32(_FLOOR)
    # below the map every value gets code 0: clamp to one step below it (no int32 overflow)
    a = np.int32(max(a, floor))
    # The region of a, then everything by constant shifts: the region's step of 2**shift
    # patterns is scaled to 2**20 by a multiplier (no variable shift, no helper function:
    # Numba compiles this function alone). Every intermediate is wrapped in np.int32: Numba
    # widens int32 arithmetic to int64, which halves the SIMD lanes.
    below2 = a < l2
    below1 = a < l1
    below0 = a < l0
    c0 = k3 if below2 else k2
    c0 = c0 if below1 else k1
    c0 = c0 if below0 else k0
    low = l3 if below2 else l2
    low = low if below1 else l1
    low = low if below0 else l0
    mul = m3 if below2 else m2
    mul = mul if below1 else m1
    mul = mul if below0 else m0
    d = np.int32(np.int32(a - low) * mul)  # (a - low) << (20 - shift); below the map: < 0
    c = np.int32(c0 + np.int32(d >> np.int32(_T_BITS)))
    t = np.int32(d & np.int32(_T_MASK))
    u = np.int32(np.uint32(h) >> np.uint32(32 - _T_BITS))
    c = np.int32(c + np.int32(u < t))
    return np.int32(min(max(c, np.int32(0)), np.int32(255)))


def s_bits(code, wide):
    """The float32 bit pattern (int32) of value ``code`` (0..255) of the map of ``s``: the
    wide map if ``wide``, else the narrow one.

    Examples
    --------
    >>> [float(np.int32(s_bits(c, False)).view(np.float32)) for c in (0, 191, 255)]
    [0.00012969970703125, 0.5, 1.0]
    >>> [float(np.int32(s_bits(c, True)).view(np.float32)) for c in (0, 191, 255)]
    [5.364418029785156e-07, 0.5, 1.0]
    """
    code = np.int32(code)
    k0 = np.int32(_WC0) if wide else np.int32(_C0)
    k1 = np.int32(_WC1) if wide else np.int32(_C1)
    k2 = np.int32(_WC2) if wide else np.int32(_C2)
    k3 = np.int32(_WC3) if wide else np.int32(_C3)
    l0 = np.int32(_WL0) if wide else np.int32(_L0)
    l1 = np.int32(_WL1) if wide else np.int32(_L1)
    l2 = np.int32(_WL2) if wide else np.int32(_L2)
    l3 = np.int32(_WL3) if wide else np.int32(_L3)
    t0 = np.int32(1 << _WS0) if wide else np.int32(1 << _S0)
    t1 = np.int32(1 << _WS1) if wide else np.int32(1 << _S1)
    t2 = np.int32(1 << _WS2) if wide else np.int32(1 << _S2)
    t3 = np.int32(1 << _WS3) if wide else np.int32(1 << _S3)
    below2 = code < k2
    below1 = code < k1
    below0 = code < k0
    c0 = k3 if below2 else k2
    c0 = c0 if below1 else k1
    c0 = c0 if below0 else k0
    low = l3 if below2 else l2
    low = low if below1 else l1
    low = low if below0 else l0
    step = t3 if below2 else t2
    step = step if below1 else t1
    step = step if below0 else t0
    return np.int32(low + np.int32(np.int32(code - c0) * step))


def r_code(t, h):
    """The signed code (-127..127) of a scaled ratio ``t = r * (127 / R)`` in [-127, 127].

    Stochastic: ``int32((t + u) + 128) - 128`` (float32 adds, truncation) with ``u =
    float32(h & 0xFFF) * 2**-12``, a uniform in [0, 1): ``floor(t)`` or ``floor(t) + 1``,
    the latter with probability ``t - floor(t)`` (to 12 bits).

    Examples
    --------
    >>> int(r_code(np.float32(-127), np.uint32(0xFFFFFFFF))), int(r_code(np.float32(0.5), 0))
    (-127, 0)
    """
    u = np.float32(np.int32(np.uint32(h) & np.uint32(0xFFF))) * np.float32(2.0**-_U_R_BITS)
    q = np.int32(np.float32(np.float32(t) + u) + np.float32(128)) - np.int32(128)
    return np.int32(min(max(q, np.int32(-_R_LEVELS)), np.int32(_R_LEVELS)))


def s_map(wide: bool = False) -> np.ndarray:
    """The 256 values of the narrow (or the wide) map of ``s`` (float32, increasing, no
    zero; read-only).

    Examples
    --------
    >>> m = s_map()
    >>> float(m[0]), float(m[190]), float(m[254]), float(m[255])
    (0.00012969970703125, 0.484375, 0.9921875, 1.0)
    >>> w = s_map(wide=True)
    >>> float(w[0]), float(w[127]), float(w[190]), float(w[255])
    (5.364418029785156e-07, 0.03125, 0.484375, 1.0)
    """
    codes = np.arange(256, dtype=np.int32)
    out = np.empty(256, np.int32)
    for c0, low, shift in _regions(WIDE_REGIONS if wide else S_REGIONS):
        here = codes >= c0
        out[here] = low + ((codes[here] - c0) << shift)
        codes = np.where(here, -1, codes)
    out = out.view(np.float32)
    out.flags.writeable = False
    return out


def _s_codes(scaled, h, wide):
    """:func:`s_code` of the float32 array ``scaled`` with hashes ``h`` (uint32) and the
    per-element bool array ``wide``, vectorized."""
    out = np.empty(scaled.shape, np.int32)
    for which, regions in ((False, S_REGIONS), (True, WIDE_REGIONS)):
        sel = wide == which
        floor = _W_FLOOR if which else _FLOOR
        regs = _regions(regions)
        a = np.maximum(scaled[sel].view(np.int32) & np.int32(_HIGH_SIGN), np.int32(floor))
        c0 = np.full(a.shape, regs[-1][0], np.int32)
        low = np.full(a.shape, regs[-1][1], np.int32)
        shift = np.full(a.shape, regs[-1][2], np.int32)
        for c, lo, sh in regs[-2::-1]:
            here = a >= lo
            c0[here], low[here], shift[here] = c, lo, sh
        d = a - low
        c = c0 + (d >> shift)
        t = (d & ((np.int32(1) << shift) - 1)) << (_T_BITS - shift)
        up = (h[sel] >> np.uint32(32 - _T_BITS)).astype(np.int32) < t
        out[sel] = np.clip(c + up, 0, 255)
    return out


# -- the NumPy reference (whole blocks; the last may be partial)


def _blocks(x, block_size, nblocks, fill):
    pad = np.full(nblocks * block_size, fill, np.float32)
    pad[: x.size] = x
    return pad.reshape(nblocks, block_size)


def _block_max(x, block_size, nblocks):
    return _blocks(np.abs(x), block_size, nblocks, 0).max(axis=1)  # NaN propagates


def _wide_blocks(s, amax, block_size, nblocks):
    """Per block: whether a positive ``s`` is below ``amax * 2**-WIDE_BELOW`` (float32)."""
    with np.errstate(invalid="ignore"):
        low = _blocks(np.where(s > 0, s, np.inf), block_size, nblocks, np.inf).min(axis=1)
        return low < amax * np.float32(WIDE_FACTOR)


def _encode(y, amax, numerator, floor, block_size, codes_out, absmax_out, code_of, wide=None):
    """Codes of ``y`` (``y * (numerator / scale)`` through ``code_of``) and the absmax.

    ``scale`` is the block's ``amax`` raised to ``floor`` where it is not 0 (step 2 of the
    module's definition); a block with a NaN or Inf ``amax`` stores NaN and codes 0. With
    ``wide`` (per block, for ``s``), ``code_of`` also takes the per-element flags, and a wide
    block stores ``-scale``.
    """
    n = y.size
    ok = np.isfinite(amax)
    with np.errstate(invalid="ignore"):
        scale = np.where(amax > 0, np.maximum(amax, np.float32(floor)), np.float32(0))
    mult = np.float32(numerator) / np.where(scale > 0, scale, np.float32(1))
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = y * np.repeat(mult, block_size)[:n]
        if wide is None:
            codes = code_of(scaled)
        else:
            codes = code_of(scaled, np.repeat(wide, block_size)[:n])
            scale = np.where(wide, -scale, scale)
    bad = np.repeat(~ok, block_size)[:n]
    codes_out[:] = np.where(bad, 0, codes).astype(np.int8).view(np.uint8)
    absmax_out[:] = np.where(ok, scale, np.float32(np.nan))


def requantize_into(m, v, vmax, codes, absmax, block_size, key, index0, roots) -> None:
    """Store the updated float32 moments ``m``, ``v`` (and ``vmax``, or None) of whole blocks.

    ``codes`` and ``absmax`` map ``"m"``, ``"v"`` (and ``"vmax"``) to the output slices;
    ``index0`` is the hash index of the first element (its group's ``index_base`` plus its
    index in the group's buffer), ``key`` the step's hash key (the ratios' rounding) and
    ``roots`` the step's :func:`~adamnp.lowbit.stochastic.root_keys` (the rounding of ``s``
    and of ``sqrt(vmax)``). The definition is the module's.
    """
    n = m.size
    nb = -(-n // block_size)
    s = np.sqrt(v)
    r = np.zeros(n, np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.divide(m, s, out=r, where=s != 0)
    h = element_hashes(key, index0, n)
    offset_key, phase = roots
    with np.errstate(over="ignore"):
        h_s = element_hashes(offset_key, index0, n) + np.uint32(phase)

    def s_codes(scaled, wide):
        return _s_codes(scaled, h_s, wide)

    def r_codes(t):
        u = (h & np.uint32(0xFFF)).astype(np.float32) * np.float32(2.0**-_U_R_BITS)
        q = ((t + u) + np.float32(128)).astype(np.int32) - 128
        return np.clip(q, -_R_LEVELS, _R_LEVELS)

    def encode_root(y, name):
        amax = _block_max(y, block_size, nb)
        wide = _wide_blocks(y, amax, block_size, nb)
        _encode(y, amax, 1, 0, block_size, codes[name], absmax[name], s_codes, wide)

    with np.errstate(invalid="ignore"):
        encode_root(s, "v")
        amax_r = _block_max(r, block_size, nb)
        _encode(r, amax_r, _R_LEVELS, R_FLOOR, block_size, codes["m"], absmax["m"], r_codes)
        if vmax is not None:
            encode_root(np.sqrt(vmax), "vmax")


def _roots(codes, absmax, block_size):
    """Decoded ``s``: the block's map (wide where its absmax is negative) times ``|absmax|``."""
    scale = np.repeat(absmax, block_size)[: codes.size]
    with np.errstate(invalid="ignore"):
        return np.where(scale < 0, s_map(True)[codes], s_map()[codes]) * np.abs(scale)


def dequantize_into(codes, absmax, block_size, out) -> None:
    """Decode ``out["m"]``, ``out["v"]`` (and ``out["vmax"]``) from the stored codes."""
    n = codes["v"].size
    s = _roots(codes["v"], absmax["v"], block_size)
    rscale = np.repeat(absmax["m"] / np.float32(_R_LEVELS), block_size)[:n]
    r = codes["m"].view(np.int8).astype(np.float32) * rscale
    np.multiply(s, s, out=out["v"])
    np.multiply(r, s, out=out["m"])
    if "vmax" in out:
        x = _roots(codes["vmax"], absmax["vmax"], block_size)
        np.multiply(x, x, out=out["vmax"])
