"""The 8-bit (blockwise) step kernel of the ``"cuda"`` backend, built per block size by
:func:`build`.

The step is the reference's (:func:`adamnp.backends.numpy.step_group` on an 8-bit group, with
the quantizer of :mod:`adamnp.lowbit.reference`): dequantize ``m``, ``v`` (and amsgrad's
``vmax``) with the old absmax, run the float32 element math
(:func:`adamnp.backends.math.adam_elem`, with the step's scalar record ``k`` and the four
flags, as in :mod:`.fp32`), take the new absmax of each updated block, requantize
(:func:`adamnp.lowbit.exact.quantize_bits` on the maps of :mod:`adamnp.lowbit.maps`). A
block whose updated moment holds NaN or Inf stores absmax NaN and the map's zero code.

Work split
----------
Each leaf is cut into *tiles* of ``threads * per_thread`` elements, ``per_thread =
max(4, block_size / threads)``: whole quantization blocks of one leaf (the leaf's last tile
and block may be partial), listed in a tile table ``(leaf, first element)`` like the float32
kernel's chunks. One launch per group; CUDA block ``c`` handles tiles ``c, c + grid, ...``
and the grid is the number of blocks resident at once, so the lookup tables (both maps and
both quantize tables, 36 KiB) are copied into shared memory once per resident block, not
once per quantization block.

In a tile, quantization block ``q`` belongs to ``group = block_size / per_thread`` threads
(16 to 256) and thread ``r`` of the group owns its elements ``r + j * group``, ``j <
per_thread``: a warp reads and writes runs of at least 16 consecutive elements, and all
of a thread's elements share one absmax. Per tile:

1. load everything first (indices clamped to the leaf, no branches, so all loads are in
   flight together), dequantize (maps in shared memory), ``adam_elem``, store ``p``; the
   updated moments stay in registers;
2. new absmax = integer max of ``bits(x) & 0x7FFFFFFF`` (monotone in ``|x|``; NaN and Inf
   give ``>= 0x7F800000``): over the thread's elements, then over the group's lanes of the
   warp (xor shuffles), then one shared-memory ``atomicMax`` per warp and moment; one
   ``syncthreads``;
3. requantize from registers: ``x / absmax`` (IEEE division) and ``quantize_bits`` on the
   table in shared memory; store the codes, and the group's first thread stores the absmax.

The absmax slots rotate through three buffers, one per tile in turn: a tile clears the
buffer of the next tile, whose last readers (two tiles back) have all passed the previous
tile's barrier, so one barrier per tile suffices.

Registers: with 4 elements per thread (block sizes up to 1024) the kernel is compiled with
launch bounds of 256 threads and 4 blocks per SM (at most 64 registers, no spills), so 4
blocks of 256 threads and their shared memory fit on an SM of sm_80 or sm_90. Larger block
sizes keep 8 or 16 elements per thread in registers, at lower occupancy.

Stochastic rounding of ``v`` (``v_rounding="stochastic"``, :mod:`adamnp.lowbit.stochastic`):
when the kernel's ``stochastic`` argument is set (the step's uint32 hash ``key`` comes with
it), a second loop after step 3 moves each finite block's nearest ``v`` code, just stored, to
one of the two map values around ``s = x * (1 / absmax)`` (``round_up``, the element's
``uniform`` from ``key`` and its hash index, the group's ``index_base`` plus its index in
the group's buffer, the ``v`` map in shared memory). A loop of its own keeps the nearest
loop as it was (fully unrolled at 16 elements per thread, where the merged body was not);
with the flag off it is skipped. The functions of :mod:`adamnp.lowbit.stochastic` are
compiled as device functions: their uint32 products are typed uint64 and cast back to
uint32, so they wrap mod 2**32 as on the CPU. ``m`` and amsgrad's ``vmax`` are always
rounded to nearest.

float16 and bfloat16 params (:func:`build`'s ``half``, a constant of the compiled kernel):
``p`` (and a gradient of the params' format, per leaf the third column of ``ptrs``) are
loaded as uint16 bits and upcast (:func:`.half.device_functions`); the updated params wait
in registers and are rounded back in a loop of their own before the reduction (to nearest,
or with ``p_stochastic`` from the element's hash under ``p_key``): merged into the element
loop, the rounding kept that loop from being unrolled at 16 elements per thread.

Arithmetic is exact as in :mod:`.fp32` (launched inside :func:`.util.exact_arithmetic`, no
FMA contraction). The simulator has neither warp shuffles nor libdevice: there the warp
reduction goes through a shared array (same groups, same leader lanes) and bit casts go
through NumPy views; device functions are called as plain Python.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np

from ...lowbit.exact import moment_code, quantize_bits
from ...lowbit.stochastic import block_key, mix32, round_up, uniform
from ..math import adam_elem
from .half import device_functions
from .util import (
    THREADS,
    bits_ptr,
    flags_types,
    leaf_ptr,
    rebind,
    scalars_type,
    sim_quiet,
    simulating,
)

SIM_THREADS = 64  # in the simulator: two "warps", tiles of 4 blocks of 64 elements
MIN_PER_THREAD = 4  # a tile has at least 4 elements per thread
SIM_GRID = 3  # simulator grid cap: blocks loop over several tiles
RESIDENT_THREADS = 2048  # most resident threads per SM (sm_80, sm_90): the grid cap

# numba.cuda, set by build(): the simulator swaps this module global while a kernel runs.
cuda = None


def _sim_f2i(x):
    return np.int32(np.float32(x).view(np.int32))


def _sim_i2f(x):
    return np.int32(x).view(np.float32)


@functools.cache
def build(block_size: int, half: int = -1) -> SimpleNamespace:
    """The 8-bit step kernel for ``block_size`` (a power of two, 64..4096) and parameters of
    half-precision format ``half`` (0 float16, 1 bfloat16; -1: float32 parameters)."""
    global cuda
    from numba import cuda
    from numba.cuda import types

    sim = simulating()
    bs = int(block_size)
    threads = SIM_THREADS if sim else THREADS
    per_thread = max(MIN_PER_THREAD, bs // threads)  # elements per thread and tile
    group = bs // per_thread  # threads per quantization block (16 .. threads)
    qblocks = threads // group  # quantization blocks per tile
    width = min(group, 32)  # lanes of a warp in one quantization block
    stage_size = threads if sim else 1
    tm, tv = moment_code("m").tables, moment_code("v").tables
    n_tm, n_tv = tm.table.size, tv.table.size
    f32, i32 = types.float32, types.int32
    ptr = leaf_ptr()
    # The simulator runs device functions as Python; calling them plainly skips its per-call
    # module swap (a lock shared by all threads), which would dominate the run time.
    device = (lambda f: f) if sim else cuda.jit(device=True)
    elem, quantize = device(adam_elem), device(quantize_bits)
    if sim:
        hash_key, hash_uniform = sim_quiet(block_key), sim_quiet(uniform)
        stochastic_up = round_up
    else:
        # block_key and uniform call mix32: compiled, they must call its device version.
        mix = device(mix32)
        hash_key = device(rebind(block_key, mix32=mix))
        hash_uniform = device(rebind(uniform, mix32=mix))
        stochastic_up = device(round_up)
    low32 = np.uint64(0xFFFFFFFF)
    high_shift = np.uint64(32)
    nan = np.float32(np.nan)
    half = int(half)
    is_half, hf, bits = half >= 0, device_functions(), bits_ptr()
    to_f32, round_half, p_mix, p_hash_key = hf.to_f32, hf.round_half, hf.mix, hf.hash_key
    no_u, one32 = np.uint32(0), np.uint32(1)
    # At most 64 registers per thread for tiles of 4 elements per thread: 4 blocks of 256
    # threads (and 4 x 36 KiB of shared memory) fit on an SM of sm_80 and sm_90.
    bounds = (threads, 4) if per_thread == MIN_PER_THREAD else (threads,)
    kernel_jit = cuda.jit if sim else cuda.jit(launch_bounds=bounds)
    if sim:
        f2i, i2f = _sim_f2i, _sim_i2f

        def max_into(amax, stage, buf, q, hi_m, hi_v, hi_w, amsgrad):
            """The shuffle reduction's result, through shared memory (no shuffles here)."""
            t = cuda.threadIdx.x
            stage[0, t] = hi_m
            stage[1, t] = hi_v
            stage[2, t] = hi_w
            cuda.syncthreads()  # the caller's barrier follows: none needed before reuse
            if cuda.laneid % width == 0:
                for moment in range(3 if amsgrad else 2):
                    hi = stage[moment, t : t + width].max()
                    cuda.atomic.max(amax, (buf, moment, q), hi)

    else:
        from numba.cuda import libdevice

        f2i, i2f = libdevice.float_as_int, libdevice.int_as_float

        @device
        def max_into(amax, stage, buf, q, hi_m, hi_v, hi_w, amsgrad):
            """``amax[buf, :, q] = max(it, hi over the lanes of block q)``; all lanes call.

            A butterfly of ``log2(width)`` xor shuffles, then one shared atomicMax per moment
            from the first lane of each ``width`` lanes. ``stage`` is for the simulator.
            """
            lane_mask = width // 2
            while lane_mask > 0:
                hi_m = max(hi_m, cuda.shfl_xor_sync(0xFFFFFFFF, hi_m, lane_mask))
                hi_v = max(hi_v, cuda.shfl_xor_sync(0xFFFFFFFF, hi_v, lane_mask))
                if amsgrad:
                    hi_w = max(hi_w, cuda.shfl_xor_sync(0xFFFFFFFF, hi_w, lane_mask))
                lane_mask //= 2
            if cuda.laneid % width == 0:
                cuda.atomic.max(amax, (buf, 0, q), hi_m)
                cuda.atomic.max(amax, (buf, 1, q), hi_v)
                if amsgrad:
                    cuda.atomic.max(amax, (buf, 2, q), hi_w)

    @device
    def requantize(x, amax_bits, table, shift, lo, nb, zero_code):
        """The code of ``x`` in a block of absmax bits ``amax_bits`` (the reference's)."""
        if amax_bits >= 0x7F800000:  # NaN or Inf in the block
            return zero_code
        scale = i2f(amax_bits) if amax_bits != 0 else f32(1)
        return quantize(f2i(x / scale), table, shift, lo, nb)

    @device
    def round_v(x, code, amax_bits, qmap, key, e):
        """The stochastic code of the ``v`` element of hash index ``e`` (uint64) and nearest
        code ``code``."""
        if amax_bits >= 0x7F800000:  # NaN or Inf in the block: the zero code stays
            return code
        scale = i2f(amax_bits) if amax_bits != 0 else f32(1)
        s = x * (f32(1) / scale)
        u = hash_uniform(hash_key(key, e >> high_shift), e & low32)
        return stochastic_up(s, code, qmap, u)

    @kernel_jit
    def adam_step_q8(
        ptrs, tiles, offsets, block_offsets,
        codes_m, codes_v, codes_w, absmax_m, absmax_v, absmax_w,
        map_m, map_v, table_m, table_v,
        shift_m, lo_m, nb_m, zero_m, shift_v, lo_v, nb_v, zero_v,
        k, decoupled_decay, l2_decay, amsgrad, maximize, stochastic, key, p_stochastic, p_key,
        index_base,
    ):  # fmt: skip
        """One 8-bit Adam/AdamW step of every leaf of a group (``w`` is amsgrad's vmax);
        ``stochastic``: round ``v`` stochastically with the step's uint32 hash ``key``;
        ``p_stochastic``: round half-precision params stochastically with ``p_key``; element
        ``e`` of the buffers hashes as ``index_base + e`` (int64)."""
        t = cuda.threadIdx.x
        q = t // group  # the thread's quantization block in each tile
        r = t % group  # its first element in that block; then every group-th
        s_map_m = cuda.shared.array(256, f32)
        s_map_v = cuda.shared.array(256, f32)
        s_tab_m = cuda.shared.array(n_tm, i32)
        s_tab_v = cuda.shared.array(n_tv, i32)
        amax = cuda.shared.array((3, 3, qblocks), i32)  # (buffer, moment, block of the tile)
        stage = cuda.shared.array((3, stage_size), i32)  # the simulator's warp reduction
        for i in range(t, 256, threads):
            s_map_m[i] = map_m[i]
            s_map_v[i] = map_v[i]
        for i in range(t, n_tm, threads):
            s_tab_m[i] = table_m[i]
        for i in range(t, n_tv, threads):
            s_tab_v[i] = table_v[i]
        if t < 3 * qblocks:
            amax[0, t // qblocks, t % qblocks] = 0
        cuda.syncthreads()
        new_m = cuda.local.array(per_thread, f32)
        new_v = cuda.local.array(per_thread, f32)
        new_w = cuda.local.array(per_thread, f32)
        in_p = cuda.local.array(per_thread, f32)
        in_g = cuda.local.array(per_thread, f32)
        zero = f32(0)
        buf = 0
        for c in range(cuda.blockIdx.x, tiles.shape[0], cuda.gridDim.x):
            leaf = tiles[c, 0]
            base = offsets[leaf]
            n = offsets[leaf + 1] - base
            first = tiles[c, 1] + q * bs  # first element of the thread's block
            b = min(block_offsets[leaf] + first // bs, block_offsets[leaf + 1] - 1)
            # Half params (and grads where ptrs[leaf, 2] says so) are read as uint16 bits.
            g_half = is_half and ptrs[leaf, 2] != 0
            p = ptr(ptrs[leaf, 0], 0 if is_half else n, map_m)
            p16 = bits(ptrs[leaf, 0], n if is_half else 0)
            g = ptr(ptrs[leaf, 1], 0 if g_half else n, map_m)
            g16 = bits(ptrs[leaf, 1], n if g_half else 0)
            pk0 = no_u
            pk1 = no_u
            p_low = no_u
            if is_half and p_stochastic:  # the block keys of the params' hashes
                e0 = np.uint64(index_base + base + first)
                p_low = np.uint32(e0 & low32)
                p_high = np.uint32(e0 >> high_shift)
                pk0 = p_hash_key(p_key, p_high)
                pk1 = p_hash_key(p_key, np.uint32(p_high + one32))
            nxt = buf + 1 if buf < 2 else 0
            if t < 3 * qblocks:
                amax[nxt, t // qblocks, t % qblocks] = 0
            # Load phase without branches (indices clamped to the leaf), so that all loads
            # of the tile can be in flight at once; elements past the leaf are masked below.
            old_m = absmax_m[b]
            old_v = absmax_v[b]
            # (Unsigned indices: no negative-index wraparound code.)
            for j in range(per_thread):
                i = min(first + j * group + r, n - 1)
                e = np.uint64(base + i)
                in_p[j] = to_f32(p16[i], half) if is_half else p[i]
                in_g[j] = to_f32(g16[i], half) if g_half else g[i]
                new_m[j] = s_map_m[codes_m[e]] * old_m
                new_v[j] = s_map_v[codes_v[e]] * old_v
            if amsgrad:
                old_w = absmax_w[b]
                for j in range(per_thread):
                    e = np.uint64(base + min(first + j * group + r, n - 1))
                    new_w[j] = s_map_v[codes_w[e]] * old_w
            hi_m = np.int32(0)
            hi_v = np.int32(0)
            hi_w = np.int32(0)
            for j in range(per_thread):
                i = first + j * group + r
                m = zero
                v = zero
                w = zero
                if i < n:
                    pi, m, v, w = elem(
                        in_p[j], in_g[j], new_m[j], new_v[j], new_w[j],
                        k, decoupled_decay, l2_decay, amsgrad, maximize,
                    )  # fmt: skip
                    if is_half:
                        in_p[j] = pi  # rounded in a loop of its own (below)
                    else:
                        p[i] = pi
                new_m[j] = m
                new_v[j] = v
                new_w[j] = w
                hi_m = max(hi_m, np.int32(f2i(m) & 0x7FFFFFFF))
                hi_v = max(hi_v, np.int32(f2i(v) & 0x7FFFFFFF))
                hi_w = max(hi_w, np.int32(f2i(w) & 0x7FFFFFFF))
            if is_half:  # a loop of its own: the element loop stays unrolled
                for j in range(per_thread):
                    i = first + j * group + r
                    if i < n:
                        u = no_u
                        if p_stochastic:
                            index = np.uint32(np.uint64(index_base + base + i) & low32)
                            u = p_mix(np.uint32(index ^ (pk0 if index >= p_low else pk1)))
                        p16[i] = round_half(in_p[j], u, half, p_stochastic)
            max_into(amax, stage, buf, q, hi_m, hi_v, hi_w, amsgrad)
            cuda.syncthreads()
            bits_m = amax[buf, 0, q]
            bits_v = amax[buf, 1, q]
            bits_w = amax[buf, 2, q]
            for j in range(per_thread):
                i = first + j * group + r
                if i < n:
                    e = np.uint64(base + i)
                    codes_m[e] = requantize(new_m[j], bits_m, s_tab_m, shift_m, lo_m, nb_m, zero_m)
                    codes_v[e] = requantize(new_v[j], bits_v, s_tab_v, shift_v, lo_v, nb_v, zero_v)
                    if amsgrad:
                        codes_w[e] = requantize(
                            new_w[j], bits_w, s_tab_v, shift_v, lo_v, nb_v, zero_v
                        )
            if stochastic:  # a loop of its own: the nearest loop stays as it was
                for j in range(per_thread):
                    i = first + j * group + r
                    if i < n:
                        e = np.uint64(base + i)
                        # its hash index (summed here: kept live from the tile's start,
                        # index_base + base cost register spills at 64 registers on sm_80)
                        h = np.uint64(index_base + base + i)
                        codes_v[e] = round_v(new_v[j], codes_v[e], bits_v, s_map_v, key, h)
            if r == 0 and first < n:
                absmax_m[b] = nan if bits_m >= 0x7F800000 else i2f(bits_m)
                absmax_v[b] = nan if bits_v >= 0x7F800000 else i2f(bits_v)
                if amsgrad:
                    absmax_w[b] = nan if bits_w >= 0x7F800000 else i2f(bits_w)
            buf = nxt

    return SimpleNamespace(
        block_size=bs,
        half=half,
        threads=threads,
        tile=threads * per_thread,
        per_thread=per_thread,
        grid_cap=SIM_GRID if sim else None,
        adam_step_q8=adam_step_q8,
    )


def signatures(block_sizes=(64, 256, 1024, 4096), half: int = -1) -> dict:
    """``{name: (kernel, [argument types])}`` of the 8-bit kernels (for PTX builds), for
    parameters of half-precision format ``half`` (-1: float32; names then end ``_f16`` or
    ``_bf16``)."""
    from numba.cuda import types

    table, ints, offs = types.uint64[:, ::1], types.int64[:, ::1], types.int64[::1]
    codes, f32a, i32a = types.uint8[::1], types.float32[::1], types.int32[::1]
    f32, i32 = types.float32, types.int32
    sig = (
        (table, ints, offs, offs) + (codes,) * 3 + (f32a,) * 3 + (f32a, f32a, i32a, i32a)
        + (i32,) * 8 + (scalars_type(f32), *flags_types(), types.boolean, types.uint32)
        + (types.boolean, types.uint32, types.int64)
    )  # fmt: skip
    suffix = ("", "_f16", "_bf16")[half + 1]
    return {f"adam_step_q8_bs{bs}{suffix}": (build(bs, half).adam_step_q8, [sig])
            for bs in block_sizes}  # fmt: skip
