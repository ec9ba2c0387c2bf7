"""The quantizer's fast path: a decade's codes lie on a line, so a code is a multiply-add.

The dynamic maps are a linear grid inside each decade (:func:`adamnp.quant.dynamic_map`), so
inside decade ``d`` the nearest code of a magnitude ``a`` is ``floor(a * scale[d] +
offset[d])``, clamped to the decade's last code. Which decade ``a`` is in follows from its
binary exponent: a binade (``[2**k, 2**(k+1))``) holds at most one decade boundary, so a
32-entry table indexed by the exponent gives the boundary inside it (if any) and the decade
above that boundary, and the sign of one integer difference of bit patterns picks that decade
or the one below (no compare, no select: each costs an instruction per 16 values in the
AVX-512 kernel). All tables fit in five 16-lane registers, which is what lets the AVX-512
kernel (:mod:`._numba_simd`) replace table gathers by in-register permutes. The
multiply-add is fused (one rounding, one instruction), the code is its truncation after the
clamp, and its distance to the nearest code boundary is one ``vreduceps`` there.

The multiply-add is not exact everywhere: the map values are float32 roundings of the grid and
the arithmetic rounds. :func:`~.avx512.fast_code` therefore also returns a flag, set when
the scaled position lies within `DELTA` (in code units) of a code boundary, or within 32
float32 ulps of a decade boundary; the kernels recompute each flagged element with
the exact table quantizer (:func:`~adamnp.lowbit.exact.quantize_bits`). An exhaustive sweep of every
float32 in ``[-1, 1]`` (``python tools/sweep_fast_quantizer.py``) finds no unflagged element
whose code differs from the exact one, for both maps; with ``DELTA = 4e-5`` about 1e-5 of all
patterns are flagged (``8e-5`` of uniformly spread values), and the largest error seen is below
``1e-5`` codes.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np

#: Positions closer than this (in codes) to a code boundary are flagged for the exact path.
DELTA = np.float32(4e-5)
_FIRST_EXP = 96  # binade index 0 is [2**-31, 2**-30); smaller magnitudes share it
_NO_BOUNDARY = np.float32(4.0)  # above every scaled magnitude (<= 1)
_NEAR = 32  # patterns either side of a decade boundary that are flagged (table offset)


class DecadeTables(NamedTuple):
    """Tables of :func:`~.avx512.fast_code` for one map (fields as separate arguments)."""

    binades: np.ndarray  # int32 (32,): boundary bits - 32, low 4 bits = the decade above it
    lines: np.ndarray  # float32 (3, 16): per decade scale, offset, last code
    zero: int  # the code of 0.0 (signed maps: 127; unsigned: 0)


def build_decade_tables(code):
    """Build (and cache) the decade tables of a 256-value map, or None if it has no such form.

    Parameters
    ----------
    code : ndarray
        256 strictly increasing float32 values containing 0.0, with the negative values (if
        any) mirroring the positive ones.

    Returns
    -------
    DecadeTables or None
        None when the map does not have the form: more than 16 decades, two decade boundaries
        in one binade, a lopsided signed map, or a first code below 2**-30. The kernels then
        use the exact table quantizer everywhere.

    Notes
    -----
    Decade ``0`` is the code of 0.0 alone; decade ``d >= 1`` groups the positive values with
    one ``floor(log10)``. Its line passes through the midpoints between its values (a least
    squares fit of the offset with slope ``(count - 1) / (last - first)``); a decade of one
    value has slope 0 and offset ``code + 0.5``. The boundary below decade ``d`` is the
    midpoint between its first value and the previous decade's last.

    Examples
    --------
    >>> from adamnp.quant import dynamic_map
    >>> t = build_decade_tables(dynamic_map(False))
    >>> t.binades.shape, t.lines.shape, t.zero
    ((32,), (3, 16), 0)
    """
    code = np.ascontiguousarray(code, dtype=np.float32)
    return _build_cached(code.tobytes())


@lru_cache(maxsize=8)
def _build_cached(key):
    code = np.frombuffer(key, dtype=np.float32)
    zeros = np.flatnonzero(code == 0)
    if zeros.size != 1:
        return None
    zero = int(zeros[0])
    if zero and not np.array_equal(-code[:zero][::-1], code[zero + 1 : 2 * zero + 1]):
        return None
    mags = code[zero:].astype(np.float64)  # mags[0] = 0; local code j <-> code zero + j
    mids = (mags[:-1] + mags[1:]) / 2  # mids[j - 1]: boundary below local code j
    decade = np.floor(np.log10(mags[1:]))
    starts = [0, 1, *(1 + np.flatnonzero(np.diff(decade)) + 1)]
    ends = [*starts[1:], mags.size]
    if len(starts) > 16:
        return None
    lines = np.zeros((3, 16))
    for d, (lo, hi) in enumerate(zip(starts, ends, strict=True)):
        last = hi - 1
        lines[2, d] = last
        if last == lo:
            lines[1, d] = lo + 0.5
        else:
            scale = (last - lo) / (mags[last] - mags[lo])
            inner = np.arange(lo + 1, hi)
            lines[0, d] = scale
            lines[1, d] = np.mean(inner - mids[inner - 1] * scale)
    bounds = mids[np.array(starts[1:]) - 1]  # below decades 1, 2, ...
    if bounds[0] < 2.0**-30:
        return None
    binades = np.empty(32, np.int64)
    for e in range(32):
        first, after = 2.0 ** (e + _FIRST_EXP - 127), 2.0 ** (e + _FIRST_EXP - 126)
        inside = bounds[(bounds >= first) & (bounds < after)]
        if inside.size > 1:
            return None
        edge = np.float32(inside[0] if inside.size else _NO_BOUNDARY)
        above = int(np.sum(bounds < first)) + 1  # the decade above the edge
        binades[e] = (int(edge.view(np.int32)) & ~15) + above - _NEAR
    tables = DecadeTables(binades.astype(np.int32), lines.astype(np.float32), zero)
    for a in tables[:2]:
        a.flags.writeable = False
    return tables
