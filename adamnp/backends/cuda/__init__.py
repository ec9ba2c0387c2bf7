"""The CUDA backend: the state lives in device memory and ``@cuda.jit`` kernels update it.

Leaves are CUDA device arrays: Numba device arrays or anything exposing
``__cuda_array_interface__`` (CuPy arrays, PyTorch CUDA tensors), used in place without a
host copy. This module is the backend's front (the contract of :mod:`adamnp.backends`:
allocation, copies, address tables, launches); the kernels are in :mod:`.fp32` (float32 and
float64 state, reductions, fill, traffic), :mod:`.q8` and :mod:`.q8_sqrt` (8-bit state),
with what they share in :mod:`.util`. Importing this package does not import numba-cuda; the
kernels are built on first use.

Launches: each group of leaves (one per dtype) is updated by ONE multi-tensor kernel launch
on the default stream, whatever the number of leaves. The leaves' addresses travel in a small
table, uploaded asynchronously from pinned memory and only when an address changed since the
last step, so the update itself never waits for the GPU. The non-finite check (the default
``nonfinite="raise"``, and ``"skip"``) and gradient clipping each need one reduction over the
gradients and one synchronization per step; ``nonfinite="propagate"`` without clipping
needs none. Host work per step is the address table and the validation of each leaf (see
docs/backends.md).

Results are bit-identical to the NumPy reference: the kernels run the shared element math
(:func:`adamnp.backends.math.adam_elem`, given the step's
:class:`~adamnp.backends.math.KernelScalars` record and the four flags of
:func:`~adamnp.backends.math.kernel_flags`) compiled without FMA contraction. The one
exception is clipping: the gradient norm is summed in another (fixed, deterministic) order
than NumPy's, so the clipping factor may differ in its last bit.

8-bit groups (``state_bits=8``) have their own kernels, one per state format and block size,
also one launch per group. ``"bnb"`` (:mod:`.q8`): dequantize, the same element math, new
absmax per block, requantize with the shared exact lookup
(:func:`adamnp.lowbit.exact.quantize_bits`), so codes and absmax values equal the
reference's too. Its maps (:mod:`adamnp.lowbit.maps`) and lookup tables are uploaded once per
group. With ``v_rounding="stochastic"`` the same kernel also rounds the codes of ``v``
stochastically (:mod:`adamnp.lowbit.stochastic`), keyed by the step and the group's tag
(:attr:`~adamnp._state.LeafGroup.tag`), each element hashed by its index in the group's
buffers plus the group's ``index_base``, as in the reference. ``"sqrt"``, the default
(:mod:`.q8_sqrt`, format :mod:`adamnp.lowbit.sqrt`): the same launch without tables;
``sqrt(v)`` and ``m / sqrt(v)`` are rounded stochastically with the same key and indices.

float16 and bfloat16 params (:mod:`.half`): the same launches with the params read and
written as uint16 bits, upcast to float32 and rounded back (to nearest or stochastically) by
the scalar functions of :mod:`adamnp.lowbit.half` compiled as device functions; a third
column of the address table says per leaf whether its gradient is half or float32. float16
leaves come through ``__cuda_array_interface__`` (typestr ``<f2``); bfloat16 has no typestr
of its own: a Numba device array of ``ml_dtypes.bfloat16`` carries its dtype, and ``<V2``
(what torch exports for bfloat16, and ``ml_dtypes.bfloat16``'s ``dtype.str``) is read as
bfloat16 (:func:`device_dtype`).
"""

from __future__ import annotations

import importlib.util
import math
import weakref
from types import SimpleNamespace

import numpy as np

from ...lowbit.half import half_format, param_key, typestr_dtype
from ...lowbit.stochastic import group_key, root_keys
from ..math import grad_limit, kernel_flags, kernel_scalars

NAME = "cuda"
INSTALL = 'pip install "adamnp[cuda]" (from a source checkout: pip install -e ".[cuda]")'


def _k():
    from .fp32 import build

    return build()


def availability() -> str | None:
    """None if numba-cuda imports and a GPU (or its simulator) is present; else why not.

    Examples
    --------
    >>> availability() is None or "adamnp[cuda]" in availability() or "GPU" in availability()
    True
    """
    if importlib.util.find_spec("numba_cuda") is None:
        return f"numba-cuda is not installed; {INSTALL}"
    try:
        k = _k()
    except ImportError as exc:
        return f"numba-cuda cannot be imported ({exc}); {INSTALL}"
    if k.sim or k.cuda.is_available():
        return None
    return (
        "no CUDA GPU or driver was found (numba-cuda is installed; NUMBA_ENABLE_CUDASIM=1 "
        "runs its simulator)"
    )


def owns(array) -> bool:
    """True for CUDA device arrays: ``__cuda_array_interface__`` or Numba device arrays.

    Examples
    --------
    >>> owns(np.zeros(3))
    False
    """
    if isinstance(array, np.ndarray):
        return False
    return hasattr(array, "__cuda_array_interface__") or bool(
        getattr(array, "__cuda_ndarray__", False)
    )


def _iface(a) -> dict:
    cai = getattr(a, "__cuda_array_interface__", None)
    return cai if cai is not None else a.__array_interface__  # the simulator's arrays


def device_dtype(a) -> np.dtype:
    """The NumPy dtype of device array ``a``: a Numba device array's own (it may be
    ``ml_dtypes.bfloat16``), else its interface's typestr, with ``<V2`` read as bfloat16
    (torch's typestr for it) when ``ml_dtypes`` is installed.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> device_dtype(SimpleNamespace(__cuda_array_interface__={"typestr": "<f2"}))
    dtype('float16')
    """
    if getattr(a, "__cuda_ndarray__", False):
        return np.dtype(a.dtype)
    return typestr_dtype(_iface(a)["typestr"])


def _nbytes(cai) -> int:
    return math.prod(cai["shape"]) * np.dtype(cai["typestr"]).itemsize


def is_contiguous(a) -> bool:
    """Whether ``a`` is C-contiguous (read from its array interface)."""
    cai = _iface(a)
    shape, strides = tuple(cai["shape"]), cai.get("strides")
    if strides is None or 0 in shape:
        return True
    expected = np.dtype(cai["typestr"]).itemsize
    for dim, stride in zip(reversed(shape), reversed(tuple(strides))):
        if dim != 1 and stride != expected:
            return False
        expected *= dim
    return True


def is_writeable(a) -> bool:
    """Whether ``a`` may be written (the interface's read-only flag)."""
    return not _iface(a)["data"][1]


def address_range(a) -> tuple[int, int]:
    """``(first byte, one past the last byte)`` of a contiguous device array."""
    cai = _iface(a)
    start = int(cai["data"][0] or 0)
    return start, start + _nbytes(cai)


def _stream():
    return _k().cuda.default_stream()


def synchronize() -> None:
    """Wait until all queued device work has finished (for timings)."""
    _k().cuda.synchronize()


def _launch(kernel, blocks: int, *args, threads: int | None = None) -> None:
    k = _k()
    with k.exact_arithmetic():
        kernel[blocks, threads or k.threads, _stream()](*args)


def full(n: int, value, dtype):
    """A flat device array of ``n`` elements equal to ``value``."""
    a = _k().cuda.device_array(n, dtype)
    if n:
        blocks = min(-(-n // _k().chunk), 1 << 14)
        _launch(_k().fill, blocks, a, np.dtype(dtype).type(value))
    return a


def zeros(n: int, dtype):
    """A zeroed flat device array."""
    return full(n, 0, dtype)


def _numba_array(a):
    return a if getattr(a, "__cuda_ndarray__", False) else _k().cuda.as_cuda_array(a)


def to_host(a) -> np.ndarray:
    """A host copy of device array ``a`` (synchronizes)."""
    return _numba_array(a).copy_to_host()


def from_host(a: np.ndarray):
    """A device copy of host array ``a``."""
    return _k().cuda.to_device(np.ascontiguousarray(a))


def copy_from_host(dst, src: np.ndarray) -> None:
    """Copy host array ``src`` into device array ``dst`` (same dtype and shape)."""
    if src.size:
        _numba_array(dst).copy_to_device(np.ascontiguousarray(src))


def _tables(sizes, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(chunks, offsets)`` for leaves of ``sizes`` (see :mod:`.fp32`)."""
    chunk = chunk or _k().chunk
    sizes = np.asarray(sizes, np.int64)
    offsets = np.zeros(len(sizes) + 1, np.int64)
    offsets[1:] = np.cumsum(sizes)
    counts = -(-sizes // chunk)
    first = np.cumsum(counts) - counts
    chunks = np.empty((int(counts.sum()), 2), np.int64)
    chunks[:, 0] = np.repeat(np.arange(len(sizes)), counts)
    chunks[:, 1] = (np.arange(len(chunks)) - np.repeat(first, counts)) * chunk
    return chunks, offsets


def _addr(a) -> int:
    return int(_iface(a)["data"][0] or 0)


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(group) -> SimpleNamespace:
    """Device tables of a group, built on its first step and kept while the group lives."""
    plan = _PLANS.get(group)
    if plan is None:
        cuda = _k().cuda
        tile = _q8_kernels(group).tile if group.kind == "q8" else None
        chunks, offsets = _tables(np.diff(group.offsets), tile)
        k = len(group.leaf_ids)
        cols = 3 if group.half >= 0 else 2  # half params: whether each grad is half
        plan = SimpleNamespace(
            nchunks=len(chunks),
            q8=None if tile is None else _q8_plan(group),
            chunks=cuda.to_device(chunks),
            offsets=cuda.to_device(offsets),
            ptrs=cuda.device_array((k, cols), np.uint64),
            staging=[cuda.pinned_array((k, cols), np.uint64) for _ in range(2)],
            events=[cuda.event() for _ in range(2)],
            turn=0,
            last=None,
        )
        _PLANS[group] = plan
    return plan


def _upload(plan, table: np.ndarray) -> None:
    """Send the address table to the device unless it is the one already there.

    Two pinned staging buffers alternate; an event per buffer says when its last copy ran, so
    a buffer is never rewritten while a copy may still read it.
    """
    if plan.last is not None and np.array_equal(plan.last, table):
        return
    i = plan.turn
    plan.turn = 1 - i
    plan.events[i].synchronize()
    plan.staging[i][...] = table
    stream = _stream()
    plan.ptrs.copy_to_device(plan.staging[i], stream=stream)
    plan.events[i].record(stream)
    plan.last = table


def step_group(group, params, grads, scalars) -> None:
    """Update every leaf of ``group`` with one kernel launch (asynchronous).

    The math and its order are those of :func:`adamnp.backends.numpy.update_chunk`; for
    8-bit groups, of the reference's 8-bit step (:func:`adamnp.backends.numpy.step_group`
    with the quantizer of :mod:`adamnp.lowbit.reference` or, for the ``"sqrt"`` format, the
    codes of :mod:`adamnp.lowbit.sqrt`).
    """
    plan = _plan(group)
    if plan.nchunks == 0:
        return
    ids = group.leaf_ids
    if group.half >= 0:  # half params: a third column, 1 where the gradient is half too
        rows = [(_addr(params[i]), _addr(grads[i]), _itemsize(grads[i]) == 2) for i in ids]
        table = np.array(rows, np.uint64).reshape(-1, 3)
    else:
        table = np.array([(_addr(params[i]), _addr(grads[i])) for i in ids], np.uint64)
        table = table.reshape(-1, 2)
    _upload(plan, table)
    k = kernel_scalars(scalars, group.dtype)
    if group.kind == "q8":
        _step_q8(group, plan, k, scalars)
        return
    m, v = group.buffers["m"], group.buffers["v"]
    vmax = group.buffers.get("vmax", m)  # a placeholder unless amsgrad: never touched
    args = (plan.ptrs, plan.chunks, plan.offsets, m, v, vmax, k, *kernel_flags(scalars))
    if group.half >= 0:
        kernel = _half(group.half).adam_step_half
        rounding = _param_rounding(group, scalars)
        _launch(kernel, plan.nchunks, *args, *rounding, np.int64(group.index_base))
        return
    _launch(_k().adam_step, plan.nchunks, *args)


def _itemsize(a) -> int:
    return np.dtype(_iface(a)["typestr"]).itemsize


def _half(fmt: int):
    from .half import build

    return build(fmt)


def _param_rounding(group, scalars) -> tuple:
    """``(stochastic, key)``: how the kernels round ``group``'s half-precision params (the
    step's :func:`~adamnp.lowbit.half.param_key`; ignored for float32 params)."""
    if group.half < 0 or not scalars.stochastic_params:
        return False, np.uint32(0)
    return True, np.uint32(param_key(scalars.step, group.tag))


def _q8(block_size: int, half: int = -1):
    from .q8 import build

    return build(block_size, half)


def _q8_sqrt(block_size: int, half: int = -1):
    from .q8_sqrt import build

    return build(block_size, half)


def _q8_kernels(group):
    """The kernel namespace of an 8-bit group: :mod:`.q8_sqrt`'s for the ``"sqrt"`` format,
    :mod:`.q8`'s for ``"bnb"`` (built for the group's parameter format)."""
    build = _q8_sqrt if group.state_format == "sqrt" else _q8
    return build(group.block_size, group.half)


def _q8_plan(group) -> SimpleNamespace:
    """The device tables an 8-bit group adds to its plan: block offsets and, for the
    ``"bnb"`` format, both maps and quantize tables (uploaded per group, so each lives on
    the group's device)."""
    from ...lowbit.exact import moment_code

    cuda = _k().cuda
    if group.state_format == "sqrt":  # no tables
        return SimpleNamespace(block_offsets=cuda.to_device(group.block_offsets),
                               constants=(), resident=None)  # fmt: skip
    (code_m, tm, zero_m), (code_v, tv, zero_v) = moment_code("m"), moment_code("v")
    # np.array: the simulator cannot copy read-only host arrays.
    arrays = tuple(cuda.to_device(np.array(a)) for a in (code_m, code_v, tm.table, tv.table))
    ints = tuple(np.int32(x) for x in (tm.shift, tm.lo, tm.nb, zero_m, tv.shift, tv.lo, tv.nb))
    return SimpleNamespace(
        block_offsets=cuda.to_device(group.block_offsets),
        constants=arrays + ints + (np.int32(zero_v),),
        resident=None,
    )


def _q8_grid(q, plan, kernel=None) -> int:
    """Blocks to launch ``kernel`` (default ``q.adam_step_q8``) with: every tile, or as many
    blocks as fit on the GPU at once (each loops over tiles), so that no block waits for a
    second wave and the lookup tables are copied into shared memory once per resident
    block."""
    if q.grid_cap:  # the simulator
        return min(plan.nchunks, q.grid_cap)
    cap = plan.q8.resident
    if cap is None:
        compiled = list((kernel or q.adam_step_q8).overloads.values())
        if compiled:  # occupancy (registers, shared memory) of the compiled kernel
            cap = plan.q8.resident = compiled[0].max_cooperative_grid_blocks(q.threads)
        else:  # first launch: bounded by threads per SM only
            from .q8 import RESIDENT_THREADS

            sms = _k().cuda.get_current_device().MULTIPROCESSOR_COUNT
            cap = sms * max(1, RESIDENT_THREADS // q.threads)
    return min(plan.nchunks, max(cap, 1))


def _step_q8(group, plan, k, s) -> None:
    b = group.buffers
    codes_w = b.get("codes_vmax", b["codes_v"])  # placeholders unless amsgrad: never touched
    absmax_w = b.get("absmax_vmax", b["absmax_v"])
    key = group_key(group, s.step)  # None: v rounded to nearest
    q = _q8_kernels(group)
    rounding = _param_rounding(group, s)
    if group.state_format == "sqrt":
        kernel = q.adam_step_q8_sqrt
        _launch(
            kernel, _q8_grid(q, plan, kernel), plan.ptrs, plan.chunks, plan.offsets,
            plan.q8.block_offsets, b["codes_m"], b["codes_v"], codes_w, b["absmax_m"],
            b["absmax_v"], absmax_w, k, *kernel_flags(s), np.uint32(key),
            *(np.uint32(x) for x in root_keys(group, s.step)), *rounding,
            np.int64(group.index_base), threads=q.threads,
        )  # fmt: skip
        return
    _launch(
        q.adam_step_q8, _q8_grid(q, plan), plan.ptrs, plan.chunks, plan.offsets,
        plan.q8.block_offsets, b["codes_m"], b["codes_v"], codes_w, b["absmax_m"],
        b["absmax_v"], absmax_w, *plan.q8.constants, k, *kernel_flags(s), key is not None,
        np.uint32(key or 0), *rounding, np.int64(group.index_base), threads=q.threads,
    )  # fmt: skip


def _grad_stats(grads):
    """Yield ``(leaf index per chunk, sum of squares per chunk, bad flag per chunk)``; a
    chunk is bad if an element is NaN, Inf or of magnitude at or above
    :func:`~adamnp.backends.math.grad_limit` (a float16 or bfloat16 gradient: its float32
    value, :mod:`.half`)."""
    k = _k()
    by_dtype: dict = {}
    for i, g in enumerate(grads):
        if _nbytes(_iface(g)):
            by_dtype.setdefault(device_dtype(g), []).append(i)
    for dtype, ids in sorted(by_dtype.items(), key=lambda item: item[0].name):
        chunks, offsets = _tables([math.prod(_iface(grads[i])["shape"]) for i in ids])
        table = np.array([[_addr(grads[i])] for i in ids], np.uint64)
        sumsq = k.cuda.device_array(len(chunks), np.float64)
        bad = k.cuda.to_device(np.zeros(len(chunks), np.int32))
        tables = (k.cuda.to_device(table), k.cuda.to_device(chunks), k.cuda.to_device(offsets))
        if half_format(dtype) >= 0:
            _launch(_half(half_format(dtype)).grad_stats_half, len(chunks), *tables, sumsq, bad)
        else:
            like = k.cuda.device_array(0, dtype)
            limit = dtype.type(grad_limit(dtype))
            _launch(k.grad_stats, len(chunks), *tables, like, limit, sumsq, bad)
        yield np.asarray(ids)[chunks[:, 0]], sumsq.copy_to_host(), bad.copy_to_host()


def nonfinite_leaf(grads) -> int:
    """Index of the first gradient with an element that is NaN, Inf or of magnitude at or
    above :func:`~adamnp.backends.math.grad_limit`, or -1 (one reduction pass)."""
    first = -1
    for leaf, _, bad in _grad_stats(grads):
        hit = leaf[bad != 0]
        if hit.size and (first < 0 or hit.min() < first):
            first = int(hit.min())
    return first


def grad_sq_norm(grads) -> float:
    """Sum of squares of all gradient elements: float64 per-chunk partials in a fixed order,
    added exactly on the host (``math.fsum``), so the result is deterministic."""
    return math.fsum(x for _, sumsq, _ in _grad_stats(grads) for x in sumsq.tolist())


def traffic_kernel(p, g, m, v) -> None:
    """Launch a kernel that moves the bytes of a float32 step (read p, g, m, v; write p, m,
    v) without its math: the bandwidth yardstick for the step. Asynchronous.

    Examples
    --------
    >>> from numba import cuda  # doctest: +SKIP
    >>> x = np.ones(1 << 20, np.float32)
    >>> p, g, m, v = (cuda.to_device(x) for _ in range(4))  # doctest: +SKIP
    >>> traffic_kernel(p, g, m, v)  # doctest: +SKIP
    >>> cuda.synchronize()  # doctest: +SKIP
    """
    p, g, m, v = (_numba_array(x) for x in (p, g, m, v))
    n = p.size
    if n:
        _launch(_k().traffic, -(-n // _k().chunk), p, g, m, v)


def traffic_kernel_q8(p, g, codes_m, codes_v) -> None:
    """Launch a kernel that moves the element bytes of an 8-bit step (read p, g and two
    uint8 code arrays; write p and the codes: 16 B per element) without its math; the
    per-block absmax traffic (16 B per block) is left out. Asynchronous."""
    p, g, codes_m, codes_v = (_numba_array(x) for x in (p, g, codes_m, codes_v))
    n = p.size
    if n:
        _launch(_k().traffic_q8, -(-n // _k().chunk), p, g, codes_m, codes_v)
