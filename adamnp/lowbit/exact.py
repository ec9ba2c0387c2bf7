"""Per-element 8-bit quantization, written once for the CPU and the GPU.

`quantize_bits` is plain scalar Python: integer arithmetic (with ``np.int32``/``np.uint32``
scalar casts, which both Numba targets compile to register operations) and one load from a
small 1-D table passed as an argument; no array calls, no allocation. The same function
object is compiled with ``numba.njit(inline="always")`` for the CPU kernels and with
``numba.cuda.jit(device=True)`` for the CUDA kernels. The caller supplies the float32 bit
pattern of the scaled value (``x / absmax``) as a signed int32: on the CPU
``np.float32(s).view(np.int32)``; on CUDA ``numba.cuda.libdevice.float_as_int(s)``, except
under the CUDA simulator, which has no libdevice and takes the CPU spelling. Pass the table
to CUDA kernels as a device array (``cuda.to_device``): it is read-only on the host.

The lookup is exact: it returns the index of the nearest map value, ties to the lower index,
i.e. ``np.searchsorted(mids, s, side="left")`` with ``mids`` the float64 midpoints of
consecutive map values, for every float32 ``s`` (see `build_quant_tables` for why).
"""

from functools import lru_cache
from typing import NamedTuple

import numpy as np

from .maps import moment_map, zero_code

_MAX_SHIFT = 20  # widest bucket: 2**20 float32 ulps
_MAX_BUCKETS = 1 << 14  # per sign; a map needing more buckets is rejected


class QuantTables(NamedTuple):
    """Lookup tables of one map for `quantize_bits` (pass the fields as separate arguments)."""

    table: np.ndarray  # int32, shape (2 * nb,), read-only: [0, nb) sign bit clear, [nb, 2 nb) set
    shift: int  # bucket k of a magnitude pattern `a` is (a >> shift) - lo, clamped to [0, nb)
    lo: int  # first bucket; every magnitude below bucket 1 has one code
    nb: int  # buckets per sign; the last one holds no threshold and absorbs larger magnitudes


def quantize_bits(bits, table, shift, lo, nb):
    """Map the float32 bit pattern of a scaled value to its 8-bit code.

    Parameters
    ----------
    bits : int
        The float32 bit pattern of the scaled value, as a *signed* int32 (an unsigned
        pattern in 0..2**32-1 works too).
    table, shift, lo, nb
        The fields of `QuantTables` from `build_quant_tables`.

    Returns
    -------
    int32
        The code, 0..255: the index of the nearest map value, ties to the lower index.

    Notes
    -----
    Each entry is ``(off << 8) | code_end``: ``code_end`` is the code at the end of the bucket
    and ``off`` the position, within the bucket, of the one point where the code changes
    (0 when it does not change). Below ``off`` the code is one less (sign bit clear: the code
    grows with the magnitude) or one more (sign bit set: it shrinks). Per element: 4 shifts,
    5 bitwise ops, 5 add/sub, a max, a min, a multiply and one table load. Vectorized with
    AVX-512, the whole quantize loop (load, divide, this, store) is about 40 instructions per
    16 elements, with the table load as two 8-lane gathers.

    Examples
    --------
    >>> import numpy as np
    >>> code = np.linspace(-1, 1, 256, dtype=np.float32)
    >>> t = build_quant_tables(code)
    >>> bits = int(np.float32(0.5).view(np.int32))
    >>> int(quantize_bits(bits, t.table, t.shift, t.lo, t.nb))
    191
    >>> int(np.abs(code - np.float32(0.5)).argmin())
    191
    """
    # The np.int32 casts keep the arithmetic 32-bit: Numba widens int32 operations to int64,
    # which halves the SIMD lanes (docs/backends.md); the unsigned index skips Numba's
    # negative-index wraparound, which would turn the table load into extra vector work.
    sign = np.int32(bits >> 31) & 1
    a = np.int32(bits & 0x7FFFFFFF)
    k = np.int32(min(max(np.int32(a >> shift) - lo, 0), nb - 1)) + np.int32(sign * nb)
    e = table[np.uint32(k)]
    below = np.int32(np.int32(a & ((1 << shift) - 1)) - np.int32(e >> 8)) >> 31  # -1 or 0
    return np.int32(e & 0xFF) + np.int32(below ^ -sign) + sign  # sign set: subtract `below`


def build_quant_tables(code):
    """Build (and cache) the `quantize_bits` lookup tables of a 256-value map.

    Parameters
    ----------
    code : ndarray
        256 strictly increasing finite float32 values.

    Returns
    -------
    QuantTables
        A table with ``2 * nb`` int32 entries plus the three scalars `quantize_bits` takes.

    Raises
    ------
    ValueError
        If two change points of the map are too close for one-compare buckets (a pathological
        map; the signed and unsigned dynamic maps need 2 * 1401 and 2 * 2900 entries, 11 and
        23 KiB, with shifts 17 and 16).

    Notes
    -----
    For a magnitude pattern ``a`` (the bits of ``|s|``, monotone in ``|s|``) the reference
    code ``searchsorted(mids, +-|s|)`` is a step function of ``a`` whose steps sit at known
    patterns: the smallest float32 above each midpoint (sign bit clear, a tie stays low) or
    the smallest float32 at or above ``-mid`` (sign bit set, a tie goes to the more negative
    value, the lower index). Buckets of ``2**shift`` consecutive patterns are chosen with the
    largest ``shift`` that leaves at most one step in every bucket, so one compare inside the
    bucket is exact. The first bucket and the last bucket hold no step and absorb every
    smaller or larger magnitude (``+-0``, subnormals, values beyond 1).

    Examples
    --------
    >>> import numpy as np
    >>> t = build_quant_tables(np.linspace(-1, 1, 256, dtype=np.float32))
    >>> t.table.dtype, t.table.shape == (2 * t.nb,)
    (dtype('int32'), True)
    """
    code = np.ascontiguousarray(code, dtype=np.float32)
    return _build_cached(code.tobytes())


def _ceil_f32_bits(v, strict):
    """Bit patterns of the smallest float32 > v (strict) or >= v, for float64 v >= 0."""
    f = v.astype(np.float32)
    wide = f.astype(np.float64)
    up = (wide <= v) if strict else (wide < v)
    f = np.where(up, np.nextafter(f, np.float32(np.inf)), f)
    return f.view(np.int32).astype(np.int64)


@lru_cache(maxsize=16)
def _build_cached(key):
    code = np.frombuffer(key, dtype=np.float32)
    mids = (code[:-1].astype(np.float64) + code[1:]) / 2  # exact for float32 neighbours
    steps = (
        _ceil_f32_bits(mids[mids >= 0], strict=True),  # sign bit clear
        _ceil_f32_bits(-mids[mids < 0], strict=False),  # sign bit set
    )
    every = np.concatenate(steps)
    for shift in range(_MAX_SHIFT, -1, -1):
        if all(np.unique(t >> shift).size == t.size for t in steps):
            break
    lo = max(int(every.min() >> shift) - 1, 0)
    nb = int(every.max() >> shift) + 1 - lo + 1
    if nb > _MAX_BUCKETS:
        raise ValueError("map values too close together for the O(1) quantizer")
    starts = (np.arange(lo, lo + nb, dtype=np.int64)) << shift
    ends = np.minimum(starts + (1 << shift) - 1, 0x7F7FFFFF)
    mags = ends.astype(np.int32).view(np.float32).astype(np.float64)
    table = np.empty(2 * nb, dtype=np.int64)
    for side, (t, sign) in enumerate(zip(steps, (1.0, -1.0), strict=True)):
        code_end = np.searchsorted(mids, sign * mags, side="left")
        off = np.zeros(nb, dtype=np.int64)
        k = np.clip((t >> shift) - lo, 0, nb - 1)
        off[k] = t - starts[k]
        table[side * nb : (side + 1) * nb] = (off << 8) | code_end
    table = table.astype(np.int32)
    table.flags.writeable = False
    return QuantTables(table, shift, lo, nb)


class MomentCode(NamedTuple):
    """What a kernel needs to (de)quantize one moment of the 8-bit state."""

    qmap: np.ndarray  # shape=(256,), float32; :func:`adamnp.lowbit.maps.moment_map`
    tables: QuantTables  # the exact quantizer's tables of ``qmap``
    zero: int  # the code of 0.0 in ``qmap``


def moment_code(name: str) -> MomentCode:
    """The map, exact-quantizer tables and zero code of moment ``name`` (``"m"``, ``"v"``;
    amsgrad's ``"vmax"`` shares ``v``'s), as every 8-bit kernel uses them.

    Examples
    --------
    >>> c = moment_code("v")
    >>> c.qmap.shape, c.zero, c.tables.table.dtype
    ((256,), 0, dtype('int32'))
    """
    qmap = moment_map(name)
    return MomentCode(qmap, build_quant_tables(qmap), zero_code(qmap))
