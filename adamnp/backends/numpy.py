"""The NumPy reference backend: the formulas transcribed plainly; the oracle for the others.

Each leaf is processed in chunks of :data:`CHUNK` elements, one NumPy ufunc per arithmetic
operation, in exactly the order the other backends (and ``torch.optim``'s single-tensor path)
use. Scalars arrive already rounded to the leaf dtype (:func:`.math.kernel_scalars`).

Memory: besides the state itself, a step allocates two scratch buffers of ``CHUNK`` elements
per leaf dtype (and, for 8-bit leaves, three more for the dequantized moments); nothing
proportional to the size of a leaf. The non-finite check and the gradient norm work chunk by
chunk too.
"""

from __future__ import annotations

import numpy as np

from ..lowbit import reference as q8
from ..lowbit import sqrt as q8sqrt
from ..lowbit.half import half_format, param_key, round_half_array, to_f32_array
from ..lowbit.maps import moment_map, zero_code
from ..lowbit.stochastic import element_hashes, group_key, root_keys
from .math import KernelScalars, grad_limit, kernel_scalars

NAME = "numpy"
CHUNK = 1 << 15  # elements per chunk (temporaries stay in cache); the Numba kernels' work item


def availability() -> str | None:
    """Always usable: NumPy is a dependency."""
    return None


def owns(array) -> bool:
    """True for host NumPy arrays."""
    return isinstance(array, np.ndarray)


def is_contiguous(a) -> bool:
    """Whether ``a`` is C-contiguous."""
    return a.flags.c_contiguous


def is_writeable(a) -> bool:
    """Whether ``a`` may be written."""
    return a.flags.writeable


def address_range(a) -> tuple[int, int]:
    """``(first byte, one past the last byte)`` of a contiguous array."""
    start = a.__array_interface__["data"][0]
    return start, start + a.nbytes


def zeros(n: int, dtype) -> np.ndarray:
    """A zeroed flat host array."""
    return np.zeros(n, dtype)


def full(n: int, value, dtype) -> np.ndarray:
    """A flat host array filled with ``value``."""
    return np.full(n, value, dtype)


def to_host(a) -> np.ndarray:
    """A host copy of ``a``."""
    return np.array(a, copy=True)


def from_host(a: np.ndarray) -> np.ndarray:
    """A backend (host) copy of ``a``."""
    return np.array(a, copy=True)


def copy_from_host(dst, src: np.ndarray) -> None:
    """Copy host array ``src`` into backend array ``dst`` (same dtype and shape)."""
    dst[...] = src


def _chunks(n: int, chunk: int = CHUNK):
    for lo in range(0, n, chunk):
        yield lo, min(lo + chunk, n)


def as_compute(a) -> np.ndarray:
    """A float16 or bfloat16 array upcast to float32 (exactly, from its bits); any other
    array as it is."""
    fmt = half_format(a.dtype)
    return a if fmt < 0 else to_f32_array(a.view(np.uint16), fmt)


def nonfinite_leaf(grads) -> int:
    """Index of the first gradient with an element that is NaN, Inf or of magnitude at or
    above :func:`~.math.grad_limit` (whose square could overflow ``v``), or -1.

    Examples
    --------
    >>> nonfinite_leaf([np.ones(2, np.float32), np.float32([1.0, -2.0**63])])
    1
    >>> nonfinite_leaf([np.float32([np.nextafter(2.0**63, 0, dtype=np.float32)])])
    -1
    """
    for i, g in enumerate(grads):
        flat = g.reshape(-1)
        limit = grad_limit(flat.dtype)
        for lo, hi in _chunks(flat.size):
            part = as_compute(flat[lo:hi])
            # max/min propagate NaN (every comparison with it is False) and reach +-Inf; no
            # boolean temporary of the leaf's size.
            if not (part.max() < limit and part.min() > -limit):
                return i
    return -1


def grad_sq_norm(grads) -> float:
    """Sum of squares of all gradient elements, accumulated in float64 chunk by chunk."""
    total = 0.0
    for g in grads:
        flat = g.reshape(-1)
        for lo, hi in _chunks(flat.size):
            part = as_compute(flat[lo:hi]).astype(np.float64)
            total += float(np.dot(part, part))
    return total


def update_chunk(p, g, m, v, vmax, k: KernelScalars, s, t1, t2) -> None:
    """One Adam/AdamW update of a chunk, in place on ``p``, ``m``, ``v`` (and ``vmax``).

    ``t1`` and ``t2`` are scratch arrays of the chunk's length. The order of operations is
    the contract every backend follows (element-wise, in the leaf dtype):

    1. ``g = g * grad_scale``; ``g = -g`` if maximize
    2. AdamW: ``p = p * decay``;  Adam with L2: ``g = g + wd * p``
    3. ``m = m + w * (g - m)`` if ``w = 1 - b1 < 0.5`` else ``m = g - (g - m) * (1 - w)``
       (torch's ``lerp``; both equal ``b1 * m + (1 - b1) * g``)
    4. ``v = v * b2 + ((1 - b2) * g) * g``;  amsgrad: ``vmax = max(vmax, v)``, use ``vmax``
    5. ``d = sqrt(v) / bc2_sqrt + eps``
    6. ``p = p + (neg_step_size * m) / d``
    """
    gs = t1
    np.multiply(g, k.grad_scale, out=gs)
    if s.maximize:
        np.negative(gs, out=gs)
    if s.decoupled_decay:
        np.multiply(p, k.decay, out=p)
    elif s.l2_decay:
        np.multiply(p, k.weight_decay, out=t2)
        np.add(gs, t2, out=gs)
    np.subtract(gs, m, out=t2)
    if k.lerp_small:
        np.multiply(t2, k.lerp_weight, out=t2)
        np.add(m, t2, out=m)
    else:
        np.multiply(t2, k.lerp_keep, out=t2)
        np.subtract(gs, t2, out=m)
    np.multiply(v, k.beta2, out=v)
    np.multiply(gs, k.one_minus_beta2, out=t2)
    np.multiply(t2, gs, out=t2)
    np.add(v, t2, out=v)
    vv = v
    if s.amsgrad:
        np.maximum(vmax, v, out=vmax)
        vv = vmax
    np.sqrt(vv, out=t2)
    np.divide(t2, k.bc2_sqrt, out=t2)
    np.add(t2, k.eps, out=t2)
    np.multiply(m, k.neg_step_size, out=t1)
    np.divide(t1, t2, out=t1)
    np.add(p, t1, out=p)


class _HalfParams:
    """A float16/bfloat16 chunk of params as float32 (:mod:`adamnp.lowbit.half`): ``load``
    upcasts it into a scratch, ``store`` rounds the updated scratch back into the params,
    to nearest or stochastically with the element hashes of the group's step key (hash
    index ``group.index_base`` plus the element's index in the group's buffers)."""

    def __init__(self, group, scalars, size):
        self.fmt = half_format(group.param_dtype)
        self.key = param_key(scalars.step, group.tag)
        self.stochastic = scalars.stochastic_params
        self.base = int(group.index_base)
        self.scratch = np.empty(size if self.fmt >= 0 else 0, np.float32)

    def load(self, p):
        if self.fmt < 0:
            return p
        out = self.scratch[: p.size]
        out[:] = to_f32_array(p.view(np.uint16), self.fmt)
        return out

    def store(self, p, x, e: int) -> None:
        """Round ``x`` into ``p``, elements ``e ..`` of the group's buffers."""
        if self.fmt < 0:
            return
        u = element_hashes(self.key, self.base + e, p.size) if self.stochastic else None
        p.view(np.uint16)[:] = round_half_array(x, self.fmt, u)


def _step_fp32(group, params, grads, s) -> None:
    k = kernel_scalars(s, group.dtype)
    t1 = np.empty(CHUNK, group.dtype)
    t2 = np.empty(CHUNK, group.dtype)
    m_all, v_all = group.buffers["m"], group.buffers["v"]
    vmax_all = group.buffers.get("vmax")
    half = _HalfParams(group, s, CHUNK)
    for j, leaf in enumerate(group.leaf_ids):
        p = params[leaf].reshape(-1)
        g = grads[leaf].reshape(-1)
        base = group.offsets[j]
        for lo, hi in _chunks(p.size):
            n = hi - lo
            a, b = base + lo, base + hi
            x = half.load(p[lo:hi])
            update_chunk(
                x,
                as_compute(g[lo:hi]),
                m_all[a:b],
                v_all[a:b],
                vmax_all[a:b] if vmax_all is not None else None,
                k,
                s,
                t1[:n],
                t2[:n],
            )
            half.store(p[lo:hi], x, a)


def step_group(group, params, grads, scalars) -> None:
    """Update every leaf of ``group`` in place (see :func:`update_chunk` for the math)."""
    if group.kind == "fp32":
        _step_fp32(group, params, grads, scalars)
    elif group.state_format == "sqrt":
        _step_sqrt(group, params, grads, scalars)
    else:
        _step_q8(group, params, grads, scalars)


def _q8_chunks(group, params, grads, names):
    """Per chunk of whole blocks of an 8-bit group: ``(p, g, codes, absmax, e)``, the
    chunk's parameter and gradient views, its slices of the code and absmax buffers of
    each moment in ``names`` and the index of its first element in the group's buffers
    (its stochastic rounding's hash index is ``group.index_base + e``)."""
    bs = group.block_size
    chunk = max(bs, CHUNK // bs * bs)
    buf = group.buffers
    for j, leaf in enumerate(group.leaf_ids):
        p = params[leaf].reshape(-1)
        g = grads[leaf].reshape(-1)
        e0, b0 = int(group.offsets[j]), int(group.block_offsets[j])
        for lo in range(0, p.size, chunk):
            hi = min(lo + chunk, p.size)
            blo, bhi = b0 + lo // bs, b0 + -(-hi // bs)
            codes = {x: buf[f"codes_{x}"][e0 + lo : e0 + hi] for x in names}
            absmax = {x: buf[f"absmax_{x}"][blo:bhi] for x in names}
            yield p[lo:hi], g[lo:hi], codes, absmax, e0 + lo


def _step_sqrt(group, params, grads, scalars) -> None:
    """The ``"sqrt"``-format 8-bit step: per chunk of whole blocks, decode the moments
    (:func:`adamnp.lowbit.sqrt.dequantize_into`), run exactly :func:`update_chunk`, store
    them again (:func:`adamnp.lowbit.sqrt.requantize_into`); the parameter update uses the
    unquantized moments."""
    k = kernel_scalars(scalars, np.float32)
    bs = group.block_size
    chunk = max(bs, CHUNK // bs * bs)
    names = ("m", "v", "vmax") if scalars.amsgrad else ("m", "v")
    t1 = np.empty(chunk, np.float32)
    t2 = np.empty(chunk, np.float32)
    scratch = {x: np.empty(chunk, np.float32) for x in names}
    key = group_key(group, scalars.step)
    roots = root_keys(group, scalars.step)
    half = _HalfParams(group, scalars, chunk)
    for p, g, codes, absmax, e in _q8_chunks(group, params, grads, names):
        n = p.size
        moments = {x: scratch[x][:n] for x in names}
        q8sqrt.dequantize_into(codes, absmax, bs, moments)
        x = half.load(p)
        update_chunk(x, as_compute(g), moments["m"], moments["v"], moments.get("vmax"), k,
                     scalars, t1[:n], t2[:n])  # fmt: skip
        half.store(p, x, e)
        q8sqrt.requantize_into(moments["m"], moments["v"], moments.get("vmax"), codes, absmax,
                               bs, key, group.index_base + e, roots)  # fmt: skip


def _step_q8(group, params, grads, scalars) -> None:
    """The ``"bnb"``-format 8-bit step: per chunk of whole blocks, dequantize with the old
    absmax, run exactly :func:`update_chunk`, requantize with each block's new absmax (the
    parameter update uses the unquantized moments); with ``v_rounding="stochastic"`` then
    round ``v``'s codes stochastically (:func:`adamnp.lowbit.reference.round_stochastic`)."""
    k = kernel_scalars(scalars, np.float32)
    bs = group.block_size
    chunk = max(bs, CHUNK // bs * bs)
    names = ("m", "v", "vmax") if scalars.amsgrad else ("m", "v")
    maps = {x: moment_map(x) for x in names}
    zeros = {x: zero_code(maps[x]) for x in names}
    t1 = np.empty(chunk, np.float32)
    t2 = np.empty(chunk, np.float32)
    scratch = {x: np.empty(chunk, np.float32) for x in names}
    key = group_key(group, scalars.step)  # None: v rounded to nearest
    half = _HalfParams(group, scalars, chunk)
    for p, g, codes, absmax, e in _q8_chunks(group, params, grads, names):
        n = p.size
        moments = {x: scratch[x][:n] for x in names}
        for x in names:
            q8.dequantize_into(codes[x], absmax[x], maps[x], bs, moments[x])
        pf = half.load(p)
        update_chunk(pf, as_compute(g), moments["m"], moments["v"], moments.get("vmax"), k,
                     scalars, t1[:n], t2[:n])  # fmt: skip
        half.store(p, pf, e)
        for x in names:
            q8.requantize_into(moments[x], maps[x], zeros[x], bs, codes[x], absmax[x])
        if key is not None:
            q8.round_stochastic(moments["v"], maps["v"], bs, codes["v"], absmax["v"], key,
                                group.index_base + e)  # fmt: skip
