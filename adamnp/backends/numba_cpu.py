"""The Numba CPU backend: fused, parallel, multi-tensor kernels on host NumPy arrays.

A step of a :class:`~adamnp._state.LeafGroup` is one compiled call, whatever the number of
leaves: the leaves' data addresses go to a ``prange`` loop over fixed chunks of at most
:data:`~._numba_util.CHUNK` elements, and each chunk is one SIMD pass over memory with the
element math of :func:`~._elem.adam_elem` inlined (see :mod:`._numba_fp32`; 8-bit groups:
:mod:`._numba_q8`, chunks of whole quantization blocks, two passes per block). Arithmetic is
float32 for float32 leaves and float64 for float64 leaves, in the operation order of
:func:`adamnp.backends.numpy.update_chunk`, without fast-math, so results equal the NumPy
reference bit for bit and do not depend on the number of threads.

Kernels are compiled on first use (one variant per dtype; flags are runtime values) and cached
on disk (``NUMBA_CACHE_DIR`` or ``__pycache__``). Numba keys a cached kernel on its own source
file only: after editing ``_elem.py``, ``_numba_util.py``, ``_q8_elem.py`` or
``_quant_numba.py``, delete the ``*.nbi``/``*.nbc`` files. A step allocates nothing
proportional to the leaves' size. Arenas are cache-line aligned; the other host-memory helpers
(``owns``, ``to_host``, ...) are the NumPy backend's. Small calls run on fewer threads
(:data:`PARALLEL_MIN`); results never depend on it.
"""

from __future__ import annotations

import functools
import weakref

import numpy as np

from .numpy import (  # host memory: the same helpers as the reference
    address_range,
    copy_from_host,
    from_host,
    is_contiguous,
    is_writeable,
    owns,
    to_host,
)

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency
    _MISSING = "the 'numba' backend needs Numba: pip install numba"
else:
    _MISSING = None
    from ._numba_fp32 import step_fp32, traffic_kernel
    from ._numba_q8 import step_q8, step_q8_simd, traffic_kernel_q8
    from ._numba_reduce import first_nonfinite, sum_squares
    from ._numba_util import CHUNK, chunk_table, data_addresses
    from ._scalars import kernel_scalars
    from ._stochastic import group_key

NAME = "numba"

__all__ = [
    "NAME",
    "address_range",
    "availability",
    "copy_from_host",
    "data_addresses",
    "from_host",
    "full",
    "grad_sq_norm",
    "is_contiguous",
    "is_writeable",
    "nonfinite_leaf",
    "owns",
    "q8_kernel",
    "step_group",
    "to_host",
    "traffic_kernel",
    "traffic_kernel_q8",
    "zeros",
]


ALIGN = 64  # bytes: arenas start on a cache line, so 64-byte vector loads do not straddle two


def zeros(n: int, dtype) -> np.ndarray:
    """A zeroed flat host array starting on a :data:`ALIGN`-byte boundary.

    Examples
    --------
    >>> a = zeros(5, np.float32)
    >>> a, a.ctypes.data % ALIGN
    (array([0., 0., 0., 0., 0.], dtype=float32), 0)
    """
    dtype = np.dtype(dtype)
    raw = np.zeros(n * dtype.itemsize + ALIGN, np.uint8)  # calloc: pages stay untouched
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + n * dtype.itemsize].view(dtype)


def full(n: int, value, dtype) -> np.ndarray:
    """A flat host array filled with ``value``, aligned like :func:`zeros`."""
    out = zeros(n, dtype)
    out.fill(value)
    return out


def availability() -> str | None:
    """None when Numba is importable, else what to install.

    Examples
    --------
    >>> availability() is None
    True
    """
    return _MISSING


_TABLES: dict = {}  # chunk tables of recent gradient trees, keyed by their leaf sizes
_MAX_TABLES = 16


def _leaf_table(arrays):
    """``(elements, chunk table, data addresses, item sizes)`` of a list of host arrays."""
    sizes = np.fromiter((a.size for a in arrays), np.int64, len(arrays))
    key = sizes.tobytes()
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.clear()
        table = _TABLES[key] = chunk_table(sizes, CHUNK)
    itemsize = np.fromiter((a.itemsize for a in arrays), np.int64, len(arrays))
    return int(sizes.sum()), table, data_addresses(arrays), itemsize


PARALLEL_MIN = 1 << 16  # elements of work per extra thread (waking one costs ~10-50 us)


def _launch(kernel, work: int, *args):
    """Call the parallel ``kernel(*args)`` with one thread per ``PARALLEL_MIN`` elements of work.

    Small calls then run on the calling thread without waking the pool: faster, and immune to
    the multi-millisecond stalls a parallel region suffers when other processes hold the cores.
    """
    threads = numba.get_num_threads()
    wanted = 1 + work // PARALLEL_MIN
    if wanted >= threads:
        return kernel(*args)
    numba.set_num_threads(wanted)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(threads)


def nonfinite_leaf(grads) -> int:
    """Index of the first gradient with a NaN or Inf element, or -1.

    Examples
    --------
    >>> nonfinite_leaf([np.ones(3, np.float32), np.array([1.0, np.inf])])
    1
    """
    if not grads:
        return -1
    return int(_launch(first_nonfinite, *_leaf_table(grads)))


def grad_sq_norm(grads) -> float:
    """Sum of squares of all gradient elements, accumulated in float64.

    Deterministic: partial sums over fixed chunks are added in a fixed order, whatever the
    number of threads (the order differs from the NumPy backend's, so the last bits may).

    Examples
    --------
    >>> grad_sq_norm([np.full(3, 2.0, np.float32), np.ones(2)])
    14.0
    """
    if not grads:
        return 0.0
    return float(_launch(sum_squares, *_leaf_table(grads)))


_NO_VMAX = {}  # dtype -> empty array standing in for vmax when amsgrad is off
_CACHES = weakref.WeakKeyDictionary()  # group -> dict, for groups without a ``cache`` field


def _cache(group) -> dict:
    """The group's backend-private cache (``group.cache``, or a dict living as long as it)."""
    cache = getattr(group, "cache", None)
    return _CACHES.setdefault(group, {}) if cache is None else cache


def step_group(group, params, grads, scalars) -> None:
    """Update every leaf of ``group`` in place with one compiled call.

    ``params`` and ``grads`` are the validated leaves of the whole tree (C-contiguous host
    arrays of the group's dtype at ``group.leaf_ids``); ``scalars`` are the step's
    :class:`~._scalars.StepScalars`. See :func:`adamnp.backends.numpy.update_chunk` for the
    operations, which run in the same order. 8-bit (``"q8"``) groups run the fused kernel
    of :mod:`._numba_q8` (dequantize, update, requantize in one pass per block).

    Examples
    --------
    >>> import adamnp
    >>> p = np.array([1.0, -2.0], np.float32)
    >>> state = adamnp.init(p, adamnp.adam(lr=0.1), backend="numba")
    >>> adamnp.step(p, np.array([0.5, -0.5], np.float32), state)  # calls step_group
    >>> p.round(6)
    array([ 0.9, -1.9], dtype=float32)
    """
    if group.kind not in ("fp32", "q8"):
        raise NotImplementedError(f"the 'numba' backend does not implement {group.kind!r} state")
    cache = _cache(group)
    table = cache.get("numba_chunks")
    if table is None:
        table = cache["numba_chunks"] = chunk_table(np.diff(group.offsets), CHUNK)
    if table.shape[0] == 0:
        return
    q8 = group.kind == "q8"
    if scalars.amsgrad != (("codes_vmax" if q8 else "vmax") in group.buffers):
        raise ValueError("amsgrad does not match the state's buffers (vmax)")
    flags = (scalars.decoupled_decay, scalars.l2_decay, scalars.amsgrad, scalars.maximize)
    p_addr, g_addr = data_addresses(params), data_addresses(grads)
    if q8:
        k = kernel_scalars(scalars, np.float32)
        _step_q8(group, table, p_addr, g_addr, k, flags, group_key(group, scalars.step))
        return
    vmax = group.buffers.get("vmax")
    if vmax is None:
        vmax = _NO_VMAX.setdefault(group.dtype, np.empty(0, group.dtype))
    _launch(
        step_fp32,
        int(group.offsets[-1]),
        table,
        group.leaf_ids,
        group.offsets,
        p_addr,
        g_addr,
        group.buffers["m"],
        group.buffers["v"],
        vmax,
        kernel_scalars(scalars, group.dtype),
        flags,
    )


@functools.cache
def _q8_maps() -> tuple:
    """``(map_m, map_v, tables_m, tables_v, zero codes)``: the 8-bit kernel's constant inputs.

    The state always uses the signed dynamic map for ``m`` and the unsigned one for ``v`` and
    ``vmax`` (:mod:`adamnp._state`); the tables are the O(1) quantizer's
    (:func:`~._q8_elem.build_quant_tables`), the zero codes those of 0.0 in each map.
    """
    from ..quant import dynamic_map
    from ._q8_elem import build_quant_tables

    maps = (dynamic_map(True), dynamic_map(False))
    tables = tuple(tuple(build_quant_tables(c)) for c in maps)
    zeros = tuple(np.uint8(np.flatnonzero(c == 0)[0]) for c in maps)
    return (*maps, *tables, zeros)


@functools.cache
def _q8_simd_inputs() -> tuple | None:
    """``(planes, decades)`` of :func:`~._numba_q8.step_q8_simd`, or None where it cannot run.

    ``planes`` are the byte planes of ``map_m``, ``map_v`` and the two gap tables of ``map_v``
    (:func:`~._stochastic.gap_tables`, for stochastic rounding).

    None when the CPU lacks AVX-512 VBMI (:data:`~._numba_simd.HAVE_VBMI`) or a map lacks the
    decade form (:func:`~._q8_decades.build_decade_tables`); the gather kernel runs then.
    """
    from ._numba_simd import HAVE_VBMI, byte_planes
    from ._q8_decades import build_decade_tables
    from ._stochastic import gap_tables

    maps = _q8_maps()[:2]
    decades = [build_decade_tables(c) for c in maps]
    if not HAVE_VBMI or None in decades:
        return None
    planes = tuple(byte_planes(c) for c in (*maps, *gap_tables(maps[1])))
    return planes, tuple((d.binades, d.lines) for d in decades)


def q8_kernel() -> str:
    """Which 8-bit step kernel runs on this CPU, in words (for reports).

    Examples
    --------
    >>> q8_kernel() in ("in-register lookups (AVX-512 VBMI)", "table gathers (no AVX-512 VBMI)")
    True
    """
    if _q8_simd_inputs() is None:
        return "table gathers (no AVX-512 VBMI)"
    return "in-register lookups (AVX-512 VBMI)"


_NO_CODES = np.empty(0, np.uint8)  # stands in for codes_vmax when amsgrad is off
_NO_ABSMAX = np.empty(0, np.float32)


def _step_q8(group, table, p_addr, g_addr, k, flags, key) -> None:
    """One :func:`~._numba_q8.step_q8` call for the 8-bit ``group``.

    ``key`` is the step's :func:`~._stochastic.group_key`, None for nearest rounding of v.
    """
    if CHUNK % group.block_size:  # chunks must hold whole blocks
        raise ValueError(f"block_size {group.block_size} does not divide the chunk {CHUNK}")
    buf = group.buffers
    simd = _q8_simd_inputs()
    _launch(
        step_q8 if simd is None else step_q8_simd,
        int(group.offsets[-1]),
        table,
        group.leaf_ids,
        group.offsets,
        group.block_offsets,
        group.block_size,
        p_addr,
        g_addr,
        (buf["codes_m"], buf["codes_v"], buf.get("codes_vmax", _NO_CODES)),
        (buf["absmax_m"], buf["absmax_v"], buf.get("absmax_vmax", _NO_ABSMAX)),
        *_q8_maps(),
        k,
        flags,
        key is not None,
        np.uint32(key or 0),
        *(() if simd is None else simd),
    )
