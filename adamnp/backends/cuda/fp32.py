"""Float32 and float64 kernels of the ``"cuda"`` backend, built by :func:`build` on first use.

:func:`build` defines the step of float32 and float64 groups (``adam_step``), the gradient
reduction behind clipping and the non-finite check (``grad_stats``: NaN, Inf or a magnitude
at or above :func:`adamnp.backends.math.grad_limit`), ``fill`` (state allocation) and the
two traffic kernels of the bandwidth checks. The 8-bit step is in
:mod:`.q8`; what both use (simulator detection, ``leaf_ptr``, exact arithmetic, the scalar
record's type) is in :mod:`.util`. Nothing here imports numba-cuda until :func:`build` runs,
so ``import adamnp`` (and doctest collection) works without it.

Multi-tensor launches
---------------------
A group of leaves is updated by ONE launch. The kernels receive

* ``ptrs``: ``uint64[k, ncols]``, the device address of each leaf's param (column 0) and
  gradient (column 1), uploaded each step (gradients are usually new arrays every step),
  made typed pointers by :func:`.util.leaf_ptr`;
* ``chunks``: ``int64[nchunks, 2]``, ``(leaf, first element)`` of each chunk of
  ``threads * PER_THREAD`` consecutive elements of one leaf (never crossing a leaf boundary);
* ``offsets``: ``int64[k + 1]``, where leaf ``j`` starts in the moment arenas.

Block ``c`` handles chunk ``c`` and its threads stride through the chunk, so reads and writes
are coalesced. The 8-bit kernel (:mod:`.q8`) uses the same tables, with tiles of whole
quantization blocks instead of chunks.

Arithmetic
----------
The per-element math is :func:`adamnp.backends.math.adam_elem`, compiled as a device
function. It takes the step's scalars as one record (``k``, a
:class:`~adamnp.backends.math.KernelScalars` rounded to the leaf dtype) followed by the four
flags of :func:`adamnp.backends.math.kernel_flags`; the kernel takes and passes them on in
the same form. The kernels are launched inside :func:`.util.exact_arithmetic` (no FMA
contraction), which makes their results bit-identical to the NumPy reference.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

from ..math import adam_elem
from .util import THREADS, exact_arithmetic, flags_types, leaf_ptr, scalars_type, simulating

SIM_THREADS = 32  # threads per block in the simulator, where every thread is a Python thread
PER_THREAD = 8  # elements per thread and chunk: a chunk has threads * PER_THREAD elements

# numba.cuda, set by build(). A module global, not a closure variable, because the simulator
# swaps the `cuda` globals of a kernel's module for its fake module while the kernel runs.
cuda = None


@functools.cache
def build() -> SimpleNamespace:
    """Import numba-cuda and define the kernels; raises ImportError without numba-cuda."""
    global cuda
    from numba import cuda
    from numba.cuda import types

    sim = simulating()
    threads = SIM_THREADS if sim else THREADS
    chunk = threads * PER_THREAD
    elem = cuda.jit(device=True)(adam_elem)
    ptr = leaf_ptr()
    exact, exact_context = exact_arithmetic()
    f64 = types.float64

    @cuda.jit
    def adam_step(
        ptrs, chunks, offsets, m, v, vmax, k, decoupled_decay, l2_decay, amsgrad, maximize
    ):
        """One Adam/AdamW step of every leaf of a group (block c: chunk c); ``k`` is the
        step's :class:`~adamnp.backends.math.KernelScalars`."""
        c = cuda.blockIdx.x
        leaf = chunks[c, 0]
        lo = chunks[c, 1]
        base = offsets[leaf]
        n = offsets[leaf + 1] - base
        hi = min(lo + chunk, n)
        p = ptr(ptrs[leaf, 0], n, m)
        g = ptr(ptrs[leaf, 1], n, m)
        zero = m.dtype.type(0)
        for i in range(lo + cuda.threadIdx.x, hi, threads):
            e = base + i
            old_max = vmax[e] if amsgrad else zero
            p_new, m_new, v_new, max_new = elem(
                p[i], g[i], m[e], v[e], old_max, k, decoupled_decay, l2_decay, amsgrad, maximize
            )
            p[i] = p_new
            m[e] = m_new
            v[e] = v_new
            if amsgrad:
                vmax[e] = max_new

    @cuda.jit
    def grad_stats(ptrs, chunks, offsets, like, limit, sumsq, bad):
        """Per chunk: float64 sum of squares, and bad[c] = 1 if an element is NaN, Inf or of
        magnitude ``>= limit`` (:func:`adamnp.backends.math.grad_limit`, in ``like``'s dtype).

        Each thread sums a fixed set of elements and the block adds the thread sums in a
        fixed tree, so the result does not depend on scheduling.
        """
        c = cuda.blockIdx.x
        t = cuda.threadIdx.x
        leaf = chunks[c, 0]
        lo = chunks[c, 1]
        n = offsets[leaf + 1] - offsets[leaf]
        hi = min(lo + chunk, n)
        g = ptr(ptrs[leaf, 0], n, like)
        acc = f64(0.0)
        for i in range(lo + t, hi, threads):
            x = g[i]
            if not abs(x) < limit:  # NaN compares False
                bad[c] = 1
            y = f64(x)
            acc += y * y
        part = cuda.shared.array(threads, f64)
        part[t] = acc
        cuda.syncthreads()
        s = threads // 2
        while s > 0:
            if t < s:
                part[t] += part[t + s]
            cuda.syncthreads()
            s //= 2
        if t == 0:
            sumsq[c] = part[0]

    @cuda.jit
    def fill(a, value):
        """``a[:] = value`` (grid-stride)."""
        for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
            a[i] = value

    @cuda.jit
    def traffic(p, g, m, v):
        """The memory traffic of a float32 step (read p, g, m, v; write p, m, v), no math."""
        for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
            x = g[i]
            p[i] = p[i] + x
            m[i] = m[i] + x
            v[i] = v[i] + x

    @cuda.jit
    def traffic_q8(p, g, codes_m, codes_v):
        """The element traffic of an 8-bit step (read p, g, 2 codes; write p, 2 codes)."""
        for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
            p[i] = p[i] + g[i]
            codes_m[i] = codes_m[i] + 1
            codes_v[i] = codes_v[i] + 1

    return SimpleNamespace(
        cuda=cuda,
        sim=sim,
        threads=threads,
        chunk=chunk,
        exact=exact,
        exact_arithmetic=exact_context,
        elem=elem,
        leaf_ptr=ptr,
        adam_step=adam_step,
        grad_stats=grad_stats,
        fill=fill,
        traffic=traffic,
        traffic_q8=traffic_q8,
    )


def signatures() -> dict:
    """``{name: (kernel, [argument types, ...])}`` for every kernel (for PTX builds)."""
    from numba.cuda import types

    k = build()
    table, ints, offs = types.uint64[:, ::1], types.int64[:, ::1], types.int64[::1]
    step, stats, filler = [], [], [(types.uint8[::1], types.uint8)]
    for f in (types.float32, types.float64):
        a = f[::1]
        step.append((table, ints, offs, a, a, a, scalars_type(f), *flags_types()))
        stats.append((table, ints, offs, a, f, types.float64[::1], types.int32[::1]))
        filler.append((a, f))
    f32 = types.float32[::1]
    return {
        "adam_step": (k.adam_step, step),
        "grad_stats": (k.grad_stats, stats),
        "fill": (k.fill, filler),
        "traffic": (k.traffic, [(f32, f32, f32, f32)]),
        "traffic_q8": (k.traffic_q8, [(f32, f32, types.uint8[::1], types.uint8[::1])]),
    }
