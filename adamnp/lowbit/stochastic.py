"""Stochastic rounding of the 8-bit second moment, written once for every backend.

With nearest rounding an 8-bit ``v`` sticks: it decays by ``beta2`` (0.1% per step) while its
codes lie 1.4-12% apart, so the decayed value rounds back to the same code and ``v`` stays at
its old size long after the gradient has shrunk (docs/eight_bit.md). Stochastic rounding moves
it on average: the code goes to the upper of the two map values around ``s`` with probability
``(s - lo) / (hi - lo)``, so the dequantized ``v`` is unbiased.

Definition (every backend computes exactly these float32 and uint32 operations):

* ``s = x * (1 / absmax)``, with ``1 / absmax`` rounded to float32 (1 for a block of zeros);
* ``c`` is the nearest code of ``x / absmax`` (what nearest rounding stores) and ``d = s -
  map[c]``;
* ``u`` is a 24-bit uniform in [0, 1) from a counter-based hash of the step, the group and the
  element's hash index, the group's ``index_base`` plus its index in the group's buffers
  (`uniform`);
* if ``d >= 0`` the code moves up to ``c + 1`` when ``u * (map[c + 1] - map[c]) < d``, else it
  moves down to ``c - 1`` when ``u * (map[c] - map[c - 1]) < -d`` (never past either end of
  the map). So it lands on the upper of the two map values around ``s`` with probability
  ``(s - lo) / (hi - lo)``.

No random state is kept: the same step of the same state gives the same codes on every
backend and after a checkpoint round trip. The functions are plain scalar Python with
``np.uint32`` casts, compiled by Numba for the CPU and CUDA kernels; `uniform` also works
elementwise on NumPy uint32 arrays (the reference).
"""

from __future__ import annotations

import numpy as np

_U32 = np.uint32
_TWO_M24 = np.float32(2.0**-24)


def mix32(x):
    """A 32-bit integer hash (xor-shift-multiply; the "lowbias32" constants of hash-prospector).

    Examples
    --------
    >>> mix32(np.array([0, 1, 2], np.uint32)).tolist()
    [0, 1753845952, 3507691905]
    """
    x = _U32(x)
    x = _U32(x ^ (x >> _U32(16)))
    x = _U32(x * _U32(0x7FEB352D))
    x = _U32(x ^ (x >> _U32(15)))
    x = _U32(x * _U32(0x846CA68B))
    return _U32(x ^ (x >> _U32(16)))


def step_key(step: int, group_tag: int) -> int:
    """The hash key of step ``step`` (1-based) of the group whose first leaf is ``group_tag``.

    Computed on the host in Python integers (the same values as `mix32`, a few microseconds
    less than NumPy scalars per step).

    Examples
    --------
    >>> step_key(1, 0) != step_key(2, 0) and step_key(1, 0) != step_key(1, 1)
    True
    >>> step_key(5, 3) == int(mix32(mix32(np.array([5], np.uint32)) ^ np.uint32(3))[0])
    True
    """
    return _mix32_int(_mix32_int(step & 0xFFFFFFFF) ^ (group_tag & 0xFFFFFFFF))


def group_key(group, step: int) -> int | None:
    """The hash key of step ``step`` for an 8-bit ``group``, or None if it rounds ``v`` to
    nearest. Every backend takes its key from here (``group.tag``: its first leaf, or
    the unsharded group's for a shard of a distributed state).

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> group_key(SimpleNamespace(v_rounding="stochastic", tag=3), 5) == step_key(5, 3)
    True
    >>> group_key(SimpleNamespace(v_rounding="nearest", tag=3), 5) is None
    True
    """
    if group.v_rounding != "stochastic":
        return None
    return step_key(step, group.tag)


#: The per-step increment of the ``"sqrt"`` format's rounding of ``s``: ``2**32`` over the
#: golden ratio, so that an element's 20-bit draws ``(offset + t * S_PHASE) mod 2**32`` over
#: consecutive steps ``t`` form a Weyl sequence, as evenly spread as a sequence can be.
S_PHASE = 0x9E3779B9


def root_keys(group, step: int) -> tuple[int, int]:
    """``(offset key, phase)`` of step ``step`` for the ``"sqrt"``-format ``group``: the
    element with hash index ``e`` rounds ``s`` with the 32-bit draw ``(element hash of e
    under the offset key) + phase``, mod ``2**32``. The offset key is
    :func:`step_key` of step 0 (steps count from 1), the same at every step; the phase is
    ``step * S_PHASE``.

    An element's draws then move by a fixed irrational fraction from step to step instead of
    at random: when ``s`` drifts slowly between two map values (``v`` moves by at most
    ``1 - b2`` per step), the number of times it rounds up follows its drift within a code
    or so, where independent draws let the stored ``s`` wander like a random walk
    (docs/eight_bit.md, "Rounding of ``s``").

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> g = SimpleNamespace(tag=3)
    >>> root_keys(g, 2) == (step_key(0, 3), (2 * S_PHASE) % 2**32)
    True
    """
    return step_key(0, group.tag), (step * S_PHASE) & 0xFFFFFFFF


def _mix32_int(x: int) -> int:
    """`mix32` of a Python integer in 0..2**32-1."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def block_key(key, index_high):
    """The key for the elements whose index has the high 32 bits ``index_high``."""
    return mix32(_U32(key) ^ _U32(index_high))


def element_hashes(key, index0: int, n: int) -> np.ndarray:
    """The 32-bit hashes ``mix32(index_low ^ block_key(key, index_high))`` of the elements
    of hash indices ``index0 .. index0 + n - 1`` (a group's ``index_base`` plus the indices
    in its buffers; uint32; the NumPy reference's form of the kernels' per-element hash).

    Examples
    --------
    >>> high = np.array([1], np.uint32)  # arrays: NumPy warns when a scalar product wraps
    >>> int(element_hashes(7, 2**32 - 1, 2)[1]) == int(mix32(block_key(7, high))[0])
    True
    """
    index = np.arange(index0, index0 + n, dtype=np.uint64)
    bkey = block_key(_U32(key), (index >> np.uint64(32)).astype(np.uint32))
    return mix32((index & np.uint64(0xFFFFFFFF)).astype(np.uint32) ^ bkey)


def uniform(bkey, index_low):
    """The float32 uniform in [0, 1) of an element: 24 bits of ``mix32(index_low ^ bkey)``."""
    h = mix32(_U32(index_low) ^ _U32(bkey))
    return np.float32(h >> _U32(8)) * _TWO_M24


def round_up(s, c, qmap, u):
    """The stochastically rounded code of ``s`` (float32) given its nearest code ``c``.

    ``qmap`` is the 256-value float32 map and ``u`` the element's `uniform`. Scalar code
    (Numba); the NumPy reference and the vector kernels use the gaps of `gap_tables`, the
    same float32 differences.

    Examples
    --------
    >>> qmap = np.array([0.0, 0.5, 1.0] + [1.0] * 253, np.float32)
    >>> [int(round_up(np.float32(0.2), 0, qmap, np.float32(u))) for u in (0.3, 0.5)]
    [1, 0]
    """
    c = np.int32(c)
    mc = qmap[c]
    d = s - mc
    if d >= 0:
        if c == 255:
            return np.uint8(c)
        return np.uint8(c + np.int32(u * (qmap[c + 1] - mc) < d))
    if c == 0:
        return np.uint8(c)
    return np.uint8(c - np.int32(u * (mc - qmap[c - 1]) < -d))


def gap_tables(qmap):
    """``(up, down)``: float32 ``map[c + 1] - map[c]`` and ``map[c] - map[c - 1]`` per code.

    The missing ends (``up[255]``, ``down[0]``) are NaN, so that ``u * gap < |d|`` is false
    there and the code never leaves the map.

    Examples
    --------
    >>> up, down = gap_tables(np.linspace(0, 1, 256, dtype=np.float32))
    >>> bool(np.isnan(up[255])), bool(np.isnan(down[0])), bool(up[0] == down[1])
    (True, True, True)
    """
    qmap = np.asarray(qmap, np.float32)
    up = np.full(256, np.nan, np.float32)
    down = np.full(256, np.nan, np.float32)
    up[:-1] = qmap[1:] - qmap[:-1]
    down[1:] = up[:-1]
    return up, down
