"""The Numba CPU backend: fused, parallel, multi-tensor kernels on host NumPy arrays.

A step of a :class:`~adamnp._state.LeafGroup` is one compiled call, whatever the number of
leaves: the leaves' data addresses go to a ``prange`` loop over fixed chunks of at most
:data:`~.util.CHUNK` elements, and each chunk is one SIMD pass over memory with the
element math of :func:`~adamnp.backends.math.adam_elem` inlined (see :mod:`.fp32`; 8-bit groups:
:mod:`.q8` or :mod:`.q8_vbmi`, chunks of whole quantization blocks; :func:`q8_kernel`
picks one). Arithmetic is
float32 for float32 leaves and float64 for float64 leaves, in the operation order of
:func:`adamnp.backends.numpy.update_chunk`, without fast-math, so results equal the NumPy
reference bit for bit and do not depend on the number of threads.

Kernels are compiled on first use (one variant per dtype; flags are runtime values) and cached
on disk (``NUMBA_CACHE_DIR`` or ``__pycache__``); meanwhile :func:`adamnp.step` runs a
state's first steps on NumPy (:mod:`adamnp._background`, :mod:`.interim`). Numba keys a
cached kernel on its own source file only: after editing ``backends/math.py``, ``util.py``,
``quant.py`` or anything in ``adamnp/lowbit``, delete the ``*.nbi``/``*.nbc`` files. A step
allocates nothing proportional to the leaves' size. Arenas are cache-line aligned; the other
host-memory helpers (``owns``, ``to_host``, ...) are the NumPy backend's. Small calls run on
fewer threads (:data:`PARALLEL_MIN`); results never depend on it.
"""

from __future__ import annotations

import functools
import os
import weakref

import numpy as np

from ..numpy import (  # host memory: the same helpers as the reference
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
    from ...lowbit.decades import build_decade_tables
    from ...lowbit.exact import build_quant_tables, moment_code
    from ...lowbit.half import param_key
    from ...lowbit.stochastic import gap_tables, group_key, root_keys
    from ..math import kernel_flags, kernel_scalars
    from . import quant, schedule
    from .avx512 import HAVE_VBMI, byte_planes
    from .fp32 import CHECK_ONLY, CHECK_THEN_UPDATE, NO_CHECK, step_fp32, traffic_kernel
    from .half import format_tag, grad_kinds, step_half, traffic_kernel_half
    from .leaves import LeafSpec as leaf_spec
    from .leaves import host_leaves_ok
    from .q8 import step_q8, traffic_kernel_q8
    from .q8_sqrt import (
        step_q8_sqrt,
        step_q8_sqrt_amsgrad,
        step_q8_sqrt_half,
        step_q8_sqrt_half_amsgrad,
    )
    from .q8_vbmi import quantize_blockwise_simd, step_q8_simd
    from .reduce import first_nonfinite, sum_squares
    from .small import step_one, step_one_half
    from .util import CHUNK, chunk_table, data_addresses

NAME = "numba"

__all__ = [
    "NAME",
    "address_range",
    "availability",
    "checked_step_group",
    "copy_from_host",
    "data_addresses",
    "dequantize_into",
    "from_host",
    "full",
    "grad_sq_norm",
    "host_leaves_ok",
    "is_contiguous",
    "is_writeable",
    "kernels_on_disk",
    "leaf_spec",
    "nonfinite_leaf",
    "owns",
    "q8_kernel",
    "q8_kernel_description",
    "quantize_into",
    "step_group",
    "step_one",
    "step_one_half",
    "to_host",
    "traffic_kernel",
    "traffic_kernel_half",
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


_NO_HALF = np.empty(0, np.int8)  # the formats of 2-byte leaves when there are none


def _leaf_table(arrays):
    """``(elements, chunk table, data addresses, item sizes, half formats)`` of a list of
    host arrays (the formats: per leaf 0 float16, 1 otherwise, read for 2-byte leaves only;
    bfloat16 is the other 2-byte dtype validation lets through)."""
    sizes = np.fromiter((a.size for a in arrays), np.int64, len(arrays))
    key = sizes.tobytes()
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.clear()
        table = _TABLES[key] = chunk_table(sizes, CHUNK)
    itemsize = np.fromiter((a.itemsize for a in arrays), np.int64, len(arrays))
    half = _NO_HALF
    if (itemsize == 2).any():
        half = np.fromiter((a.dtype != np.float16 for a in arrays), np.int8, len(arrays))
    return int(sizes.sum()), table, data_addresses(arrays), itemsize, half


def _element_sizes(itemsize, half) -> tuple:
    """The ``half`` and ``wide`` arguments of the reductions (:func:`.reduce.first_nonfinite`)
    for leaves of ``itemsize`` bytes and ``half`` formats (:func:`_leaf_table`): None for the
    element sizes no leaf has, so that the kernel compiles no loop for them."""
    return (half if half.size else None), (True if (itemsize == 8).any() else None)


PARALLEL_MIN = 1 << 16  # elements of work per extra thread (waking one costs; docs/backends.md)


def _launch(kernel, work: int, *args) -> list:
    """Run the parallel ``kernel(table, *args)`` over its chunk table with one thread per
    ``PARALLEL_MIN`` elements of work (at most ``numba.get_num_threads()``), through
    :func:`.schedule.run`: batches of the table claimed by the threads that are running, so a
    busy machine never makes the step wait for a thread that has not started. Returns the
    results per batch, in table order.
    """
    threads = min(numba.get_num_threads(), 1 + work // PARALLEL_MIN)
    return schedule.run(kernel, threads, *args)


def nonfinite_leaf(grads) -> int:
    """Index of the first gradient with an element that is NaN, Inf or of magnitude at or
    above :func:`~adamnp.backends.math.grad_limit` (2**63 for float32, 2**480 for float64),
    or -1: the reference's answer (:func:`adamnp.backends.numpy.nonfinite_leaf`).

    Examples
    --------
    >>> nonfinite_leaf([np.ones(3, np.float32), np.array([1.0, np.inf])])
    1
    >>> nonfinite_leaf([np.float32([1e21]), np.ones(2)]), nonfinite_leaf([np.array([1e21])])
    (0, -1)
    """
    if not grads:
        return -1
    work, table, addr, itemsize, half = _leaf_table(grads)
    bad = _launch(first_nonfinite, work, table, addr, itemsize, *_element_sizes(itemsize, half))
    return next((int(b) for b in bad if b >= 0), -1)


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
    work, table, addr, itemsize, half = _leaf_table(grads)
    short, wide = _element_sizes(itemsize, half)
    total = 0.0
    # batch order: thread-independent
    for partial in _launch(sum_squares, work, table, addr, itemsize, short, wide):
        total += partial
    return total


_CHUNKS = weakref.WeakKeyDictionary()  # group -> its chunk table, living as long as the group


def step_group(group, params, grads, scalars) -> None:
    """Update every leaf of ``group`` in place with one compiled call.

    ``params`` and ``grads`` are the validated leaves of the whole tree (C-contiguous host
    arrays of the group's dtype at ``group.leaf_ids``); ``scalars`` are the step's
    :class:`~adamnp.backends.math.StepScalars`. See :func:`adamnp.backends.numpy.update_chunk`
    for the
    operations, which run in the same order. 8-bit (``"q8"``) groups run the fused kernel
    of :mod:`.q8` (dequantize, update, requantize in one pass per block).

    Examples
    --------
    >>> import adamnp
    >>> p = np.array([1.0, -2.0], np.float32)
    >>> state = adamnp.init(p, adamnp.adam(lr=0.1), backend="numba")
    >>> adamnp.step(p, np.array([0.5, -0.5], np.float32), state)  # calls step_group
    >>> p.round(6)
    array([ 0.9, -1.9], dtype=float32)
    """
    _step_group(group, params, grads, scalars)


def _group_table(group) -> np.ndarray:
    """The group's chunk table, made on first use and kept as long as the group."""
    table = _CHUNKS.get(group)
    if table is None:
        table = _CHUNKS[group] = chunk_table(np.diff(group.offsets), CHUNK)
    return table


def _step_group(group, params, grads, scalars, check: int = NO_CHECK) -> int:
    """:func:`step_group`; for full-precision-moment groups ``check`` is
    :func:`.fp32.step_fp32`'s (:data:`~.fp32.CHECK_THEN_UPDATE` only for a table of one
    batch; :func:`.half.step_half` takes the same): -1, or the first bad leaf's tree index
    with nothing written."""
    if group.kind not in ("fp32", "q8"):
        raise NotImplementedError(f"the 'numba' backend does not implement {group.kind!r} state")
    table = _group_table(group)
    if table.shape[0] == 0:
        return -1
    q8 = group.kind == "q8"
    if scalars.amsgrad != (("codes_vmax" if q8 else "vmax") in group.buffers):
        raise ValueError("amsgrad does not match the state's buffers (vmax)")
    flags = kernel_flags(scalars)
    p_addr, g_addr = data_addresses(params), data_addresses(grads)
    if q8:
        k = kernel_scalars(scalars, np.float32)
        key = group_key(group, scalars.step)
        half = _half_arguments(group, grads, scalars)
        if group.state_format == "sqrt":
            _step_q8_sqrt(group, table, p_addr, g_addr, k, flags, key, half, scalars.step)
        else:
            _step_q8(group, table, p_addr, g_addr, k, flags, key, half)
        return -1
    vmax = group.buffers.get("vmax")  # None without amsgrad: the kernels compile one loop
    common = (table, group.leaf_ids, group.offsets, p_addr, g_addr)
    moments = (group.buffers["m"], group.buffers["v"], vmax)
    k = kernel_scalars(scalars, group.dtype)
    half = group.half
    if half < 0:
        work = int(group.offsets[-1])
        results = _launch(_step_kernel(group), work, *common, *moments, k, flags, check)
        return next((int(r) for r in results if r >= 0), -1)  # the first in table order
    kinds = _grad_kinds(group, grads)
    results = _launch(
        _step_kernel(group),
        int(group.offsets[-1]),
        *common,
        grad_kinds(kinds),
        *moments,
        k,
        flags,
        format_tag(half, scalars.stochastic_params),
        np.uint32(param_key(scalars.step, group.tag)),
        np.int64(group.index_base),
        check,
    )
    return next((int(r) for r in results if r >= 0), -1)  # the first in table order


def _step_kernel(group):
    """The compiled kernel that steps ``group``: one per kind, format, params format (float32
    or float64 against float16/bfloat16), amsgrad for the ``"sqrt"`` format, and for the
    ``"bnb"`` format the VBMI or gather kernel (:func:`_step_q8`)."""
    half = group.half >= 0
    if group.kind == "fp32":
        return step_half if half else step_fp32
    if group.state_format == "sqrt":
        amsgrad = "codes_vmax" in group.buffers
        if half:
            return step_q8_sqrt_half_amsgrad if amsgrad else step_q8_sqrt_half
        return step_q8_sqrt_amsgrad if amsgrad else step_q8_sqrt
    vbmi = q8_kernel() == "vbmi" and not half and group.index_base == 0
    return step_q8_simd if vbmi else step_q8


def kernels_on_disk(groups) -> bool:
    """Whether Numba's disk cache holds the step kernel of every group: an index of its
    compiled versions, written by an earlier process on this machine (perhaps for other
    argument types). A guess at whether a first step would load its kernels rather than
    compile them (:mod:`adamnp._background`).

    Examples
    --------
    >>> kernels_on_disk([])
    True
    """
    try:
        return all(os.path.exists(_step_kernel(g)._cache._cache_file._index_path) for g in groups)
    except AttributeError:  # pragma: no cover - other Numba internals: assume not
        return False


def checked_step_group(group, params, grads, scalars) -> int:
    """:func:`step_group` after checking the group's gradients, in one call where the kernel
    allows: -1 when updated, else the tree index of the first leaf whose gradient is
    non-finite (:func:`nonfinite_leaf`'s test), with nothing written.

    For a state of one group this is the whole step's check, so :func:`adamnp.step` uses it
    then (one pass less over the leaves' addresses and one call less).
    """
    if group.kind == "fp32" and scalars.amsgrad == ("vmax" in group.buffers):
        # one batch: one kernel call checks every chunk before it updates any; with several
        # (each call checks only its own batch), a check-only pass of the same kernel first
        # (no second kernel to compile for the check)
        if len(schedule.batch_bounds(_group_table(group))) == 2:
            return _step_group(group, params, grads, scalars, CHECK_THEN_UPDATE)
        bad = _step_group(group, params, grads, scalars, CHECK_ONLY)
        if bad < 0:
            _step_group(group, params, grads, scalars, NO_CHECK)
        return bad
    ids = group.leaf_ids
    bad = nonfinite_leaf([grads[i] for i in ids])
    if bad >= 0:
        return int(ids[bad])
    step_group(group, params, grads, scalars)
    return -1


def _grad_kinds(group, grads) -> np.ndarray:
    """Per leaf of the half-precision ``group``: 1 if its gradient is half (the params'
    format: validated), 0 if float32."""
    ids = group.leaf_ids
    return np.fromiter((grads[i].itemsize == 2 for i in ids), np.int8, len(ids))


@functools.cache
def _q8_maps() -> tuple:
    """``(map_m, map_v, tables_m, tables_v, zero codes)``: the 8-bit kernels' constant inputs.

    Those of :func:`adamnp.lowbit.exact.moment_code` for ``m`` and ``v`` (``vmax`` shares
    ``v``'s), as the kernels take them.
    """
    codes = (moment_code("m"), moment_code("v"))
    return (
        *(c.qmap for c in codes),
        *(tuple(c.tables) for c in codes),
        tuple(np.uint8(c.zero) for c in codes),
    )


Q8_KERNELS = ("vbmi", "gather")
Q8_KERNEL_ENV = "ADAMNP_Q8_KERNEL"


def _vbmi_reason() -> str | None:
    """None when the AVX-512 VBMI kernels can run here, else why not."""
    if not HAVE_VBMI:
        return "this CPU lacks AVX-512 VBMI"
    if any(build_decade_tables(c) is None for c in _q8_maps()[:2]):  # pragma: no cover
        return "a state map lacks the decade form"
    return None


def q8_kernel() -> str:
    """The bnb-format 8-bit kernel family this process uses: ``"vbmi"`` or ``"gather"``.

    (The default ``"sqrt"`` format has one kernel, :mod:`.q8_sqrt`.) The one place the choice
    is made, for the bnb-format step and for
    :func:`adamnp.quantize_blockwise` alike: ``"vbmi"`` (in-register lookups, :mod:`.q8_vbmi`)
    where the CPU has AVX-512 VBMI, else ``"gather"`` (table lookups, :mod:`.q8`). Both give
    the same bits. The environment variable ``ADAMNP_Q8_KERNEL=gather|vbmi`` forces one
    (read on every call); forcing ``vbmi`` on a CPU without it raises ``RuntimeError``.

    Examples
    --------
    >>> q8_kernel() in Q8_KERNELS
    True
    """
    forced = os.environ.get(Q8_KERNEL_ENV, "").strip().lower()
    if forced and forced not in Q8_KERNELS:
        raise ValueError(
            f"{Q8_KERNEL_ENV}={os.environ[Q8_KERNEL_ENV]!r}: expected one of {Q8_KERNELS}"
        )
    why_not = _vbmi_reason()
    if forced == "vbmi" and why_not is not None:
        raise RuntimeError(f"{Q8_KERNEL_ENV}=vbmi, but {why_not}")
    if forced:
        return forced
    return "gather" if why_not is not None else "vbmi"


def q8_kernel_description() -> str:
    """:func:`q8_kernel` in words, for reports.

    Examples
    --------
    >>> q8_kernel_description().startswith(("in-register lookups", "table gathers"))
    True
    """
    kernel = q8_kernel()
    words = {"vbmi": "in-register lookups (AVX-512 VBMI)", "gather": "table gathers"}[kernel]
    if os.environ.get(Q8_KERNEL_ENV, "").strip():
        return f"{words}, forced by {Q8_KERNEL_ENV}"
    return words if kernel == "vbmi" else f"{words} (no AVX-512 VBMI)"


@functools.cache
def _vbmi_inputs() -> tuple:
    """``(planes, decades)`` of :func:`~.q8_vbmi.step_q8_simd`.

    ``planes`` are the byte planes of ``map_m``, ``map_v`` and the two gap tables of ``map_v``
    (:func:`~adamnp.lowbit.stochastic.gap_tables`, for stochastic rounding); ``decades`` the
    ``(binades, lines)`` of each map (:func:`~adamnp.lowbit.decades.build_decade_tables`).
    """
    maps = _q8_maps()[:2]
    decades = [build_decade_tables(c) for c in maps]
    planes = tuple(byte_planes(c) for c in (*maps, *gap_tables(maps[1])))
    return planes, tuple((d.binades, d.lines) for d in decades)


def quantize_into(flat, code, block_size, codes_out, absmax_out) -> None:
    """:func:`adamnp.lowbit.reference.quantize_into` compiled, with the kernel of
    :func:`q8_kernel`; raises ``ValueError`` if ``flat`` holds NaN or Inf (after writing part
    of the outputs) or if ``code`` is too irregular for the exact quantizer's tables.

    Examples
    --------
    >>> from adamnp.lowbit.maps import dynamic_map
    >>> codes, absmax = np.empty(4, np.uint8), np.empty(1, np.float32)
    >>> quantize_into(np.array([0.5, -1, 0, 0.25], np.float32), dynamic_map(True), 64, codes,
    ...               absmax)
    >>> codes.tolist(), absmax.tolist()
    ([219, 0, 127, 201], [1.0])
    """
    t = build_quant_tables(code)
    args = (flat, block_size, t.table, t.shift, t.lo, t.nb, codes_out, absmax_out)
    decades = build_decade_tables(code) if q8_kernel() == "vbmi" else None
    if decades is None:
        quant.quantize_blockwise(*args)
    else:
        quantize_blockwise_simd(*args, *decades)
    if not np.all(np.isfinite(absmax_out)):
        raise ValueError("x contains NaN or Inf; it cannot be quantized")


def dequantize_into(codes, absmax, code, block_size, out) -> None:
    """:func:`adamnp.lowbit.reference.dequantize_into` compiled (the same bits)."""
    quant.dequantize_blockwise(codes, absmax, block_size, code, out)


_NO_CODES = np.empty(0, np.uint8)  # stands in for codes_vmax when amsgrad is off
_NO_ABSMAX = np.empty(0, np.float32)


def _q8_arguments(group, table, p_addr, g_addr) -> tuple:
    """The arguments both 8-bit kernels take first: the chunk table, the group's layout
    (leaf ids, element and block offsets, block size), the leaves' addresses, and the code and
    absmax buffers as ``(m, v, vmax)`` each (empty stand-ins for vmax without amsgrad).
    Chunks must hold whole blocks."""
    if CHUNK % group.block_size:
        raise ValueError(f"block_size {group.block_size} does not divide the chunk {CHUNK}")
    buf = group.buffers
    return (
        table,
        group.leaf_ids,
        group.offsets,
        group.block_offsets,
        group.block_size,
        p_addr,
        g_addr,
        (buf["codes_m"], buf["codes_v"], buf.get("codes_vmax", _NO_CODES)),
        (buf["absmax_m"], buf["absmax_v"], buf.get("absmax_vmax", _NO_ABSMAX)),
    )


def _half_arguments(group, grads, scalars) -> tuple | None:
    """``(fmt, g_half, key)``: the half-precision parameter arguments of the 8-bit kernels
    (:func:`~.half.format_tag`, the gradients' kinds, the parameter key); None for a
    float32 group."""
    if group.half < 0:
        return None
    key = param_key(scalars.step, group.tag)
    fmt = format_tag(group.half, scalars.stochastic_params)
    return fmt, _grad_kinds(group, grads), np.uint32(key)


def _step_q8_sqrt(group, table, p_addr, g_addr, k, flags, key, half, step) -> None:
    """One :func:`~.q8_sqrt.step_q8_sqrt` call for the ``"sqrt"``-format ``group``
    (:func:`~.q8_sqrt.step_q8_sqrt_half` for float16/bfloat16 params; their ``_amsgrad``
    versions with amsgrad, so that a state compiles only the kernel it runs)."""
    work, args = int(group.offsets[-1]), _q8_arguments(group, table, p_addr, g_addr)
    base = np.int64(group.index_base)
    s_key, phase = (np.uint32(x) for x in root_keys(group, step))
    kernel = _step_kernel(group)
    if half is None:
        _launch(kernel, work, *args, k, flags, np.uint32(key), s_key, phase, base)
    else:
        _launch(kernel, work, *args, k, flags, np.uint32(key), s_key, phase, *half, base)


def _step_q8(group, table, p_addr, g_addr, k, flags, key, half) -> None:
    """One :func:`~.q8.step_q8` (or :func:`~.q8_vbmi.step_q8_simd`) call for the
    ``"bnb"``-format 8-bit ``group``.

    ``key`` is the step's :func:`~adamnp.lowbit.stochastic.group_key`, None for nearest
    rounding of v; ``half`` the :func:`_half_arguments`. A group of float16 or bfloat16
    params, or with a nonzero ``index_base`` (a shard of a distributed state), always runs
    the gather kernel :func:`~.q8.step_q8`, whatever :func:`q8_kernel` says: the AVX-512 VBMI
    kernel takes float32 params only and hashes element ``e`` as ``e``.
    """
    simd = _vbmi_inputs() if _step_kernel(group) is step_q8_simd else None
    # None or True (None: the kernels compile none of the feature's code)
    vmax = True if "codes_vmax" in group.buffers else None
    stochastic = None if key is None else True
    if simd is not None:
        _launch(step_q8_simd, int(group.offsets[-1]), *_q8_arguments(group, table, p_addr, g_addr),
                *_q8_maps(), k, flags, stochastic, np.uint32(key or 0), *simd,
                vmax)  # fmt: skip
        return
    _launch(
        step_q8,
        int(group.offsets[-1]),
        *_q8_arguments(group, table, p_addr, g_addr),
        *_q8_maps(),
        k,
        flags,
        stochastic,
        np.uint32(key or 0),
        *((None, _NO_HALF, np.uint32(0)) if half is None else half),  # None: float32 params
        np.int64(group.index_base),
        vmax,
    )
