"""The ``"sqrt"``-format 8-bit step kernel of the ``"cuda"`` backend, built per block size by
:func:`build`.

The step is the reference's (:func:`adamnp.backends.numpy.step_group` on a group of
``state_format="sqrt"``; the format is :mod:`adamnp.lowbit.sqrt`): decode ``s =
s_value(code_v) * S`` (a float32 bit pattern, :func:`~adamnp.lowbit.sqrt.s_bits`), ``v = s *
s`` and ``m = (q * (R / 127)) * s`` from the signed byte ``q`` (and amsgrad's ``vmax`` like
``v``), run the float32 element math (:func:`adamnp.backends.math.adam_elem`, the step's
scalar record ``k`` and the four flags, as in :mod:`.fp32`), then store ``s = sqrt(v)`` and
``r = m / s`` (0 where ``s`` is 0) with the block's new maxima ``S`` and ``R``,
both rounded stochastically (:func:`~adamnp.lowbit.sqrt.s_code`,
:func:`~adamnp.lowbit.sqrt.r_code`): ``r`` with the hash ``mix32(index_low ^
block_key(key, index_high))`` of the element's hash index (the group's ``index_base`` plus
its index in the group's buffers), ``key`` the step's
:func:`~adamnp.lowbit.stochastic.group_key`; ``s`` (and ``sqrt(vmax)``) with the same hash
under the offset key of :func:`~adamnp.lowbit.stochastic.root_keys` plus the step's phase.
A block whose ``s``, ``|r|`` (or ``sqrt(vmax)``) holds NaN or Inf stores absmax NaN and
code 0 for that moment.

Work split and launch are :mod:`.q8`'s: tiles of ``threads * per_thread`` elements (whole
quantization blocks of one leaf), a grid of at most the blocks resident at once, each CUDA
block looping over tiles, each quantization block owned by ``block_size / per_thread``
threads. Per tile:

1. load ``p``, ``g`` and the codes (indices clamped to the leaf, no branches), decode,
   ``adam_elem``, store ``p``; keep ``r``, ``s`` and ``sqrt(vmax)`` in registers;
2. block maxima as integer maxima of ``bits(x) & 0x7FFFFFFF`` (NaN and Inf give ``>=
   0x7F800000``): over the thread's elements, the group's lanes (xor shuffles), then one
   shared ``atomicMax`` per warp and moment; one ``syncthreads``;
3. per element the hash (the keys of the thread's block computed once per tile, as
   :func:`adamnp.backends.numba.quant.block_keys` does), then ``s / S`` (IEEE division)
   through ``s_code``, ``(r / R) * 127`` through ``r_code`` (stored as ``q & 0xFF``) and
   amsgrad's ``sqrt(vmax) / X`` through ``s_code``, one loop per moment (a merged loop is
   not unrolled at 16 elements per thread, which puts the per-thread arrays in local
   memory); the group's first thread stores the absmax.

float16 and bfloat16 params are read, upcast and rounded back as in :mod:`.q8`.

No lookup table: the only shared memory is the three rotating absmax buffers (see
:mod:`.q8`). The scalar functions of :mod:`adamnp.lowbit.sqrt` and ``mix32`` are compiled
as device functions; every constant is float32 or int32, so no operation is widened to
float64. Exact arithmetic as in :mod:`.fp32` (no FMA contraction). In the simulator, the
warp reduction goes through shared memory, bit casts through NumPy views, and the device
functions run as plain Python (``mix32`` with NumPy's overflow warning off).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np

from ...lowbit.sqrt import R_FLOOR, WIDE_FACTOR, r_code, s_bits, s_code
from ...lowbit.stochastic import block_key, mix32
from ..math import adam_elem
from .half import device_functions
from .q8 import MIN_PER_THREAD, SIM_GRID, SIM_THREADS, _sim_f2i, _sim_i2f
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

# numba.cuda, set by build(): the simulator swaps this module global while a kernel runs.
cuda = None


@functools.cache
def build(block_size: int, half: int = -1) -> SimpleNamespace:
    """The ``"sqrt"``-format 8-bit step kernel for ``block_size`` (a power of two, 64..4096).

    Parameters
    ----------
    block_size : int
        Elements per quantization block.
    half : int
        The parameters' half-precision format (0 float16, 1 bfloat16), -1 for float32.

    Returns
    -------
    SimpleNamespace
        ``adam_step_q8_sqrt`` (the kernel), ``block_size``, ``threads`` (per CUDA block),
        ``tile`` (elements per tile), ``per_thread`` and ``grid_cap`` (the simulator's grid
        cap, None on a GPU), as :func:`.q8.build`'s.
    """
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
    f32, i32 = types.float32, types.int32
    ptr = leaf_ptr()
    # The simulator runs device functions as plain Python (see .q8).
    device = (lambda f: f) if sim else cuda.jit(device=True)
    elem = device(adam_elem)
    encode_s, value_bits, encode_r = device(s_code), device(s_bits), device(r_code)
    if sim:
        mix, hash_key = sim_quiet(mix32), sim_quiet(block_key)
    else:
        mix = device(mix32)
        hash_key = device(rebind(block_key, mix32=mix))  # block_key calls mix32
    low32 = np.uint64(0xFFFFFFFF)
    high_shift = np.uint64(32)
    one32 = np.uint32(1)
    nan = np.float32(np.nan)
    zero = np.float32(0)
    one = np.float32(1)
    levels = np.float32(127)
    r_floor = np.float32(R_FLOOR)
    wide_factor = np.float32(WIDE_FACTOR)
    sign_off = np.int32(0x7FFFFFFF)
    no_code = np.int32(0)
    inf_bits = np.int32(0x7F800000)
    half = int(half)
    is_half, hf, bits = half >= 0, device_functions(), bits_ptr()
    to_f32, round_half, p_mix, p_hash_key = hf.to_f32, hf.round_half, hf.mix, hf.hash_key
    no_u = np.uint32(0)
    bounds = (threads, 4) if per_thread == MIN_PER_THREAD else (threads,)
    kernel_jit = cuda.jit if sim else cuda.jit(launch_bounds=bounds)
    if sim:
        f2i, i2f = _sim_f2i, _sim_i2f

        def max_into(amax, stage, buf, q, hi_r, hi_s, hi_x, lo_s, lo_x, amsgrad):
            """The shuffle reduction's result, through shared memory (no shuffles here)."""
            t = cuda.threadIdx.x
            stage[0, t] = hi_r
            stage[1, t] = hi_s
            stage[2, t] = hi_x
            stage[3, t] = lo_s
            stage[4, t] = lo_x
            cuda.syncthreads()  # the caller's barrier follows: none needed before reuse
            if cuda.laneid % width == 0:
                for moment in (0, 1, 2, 3, 4) if amsgrad else (0, 1, 3):
                    hi = stage[moment, t : t + width].max()
                    cuda.atomic.max(amax, (buf, moment, q), hi)

    else:
        from numba.cuda import libdevice

        f2i, i2f = libdevice.float_as_int, libdevice.int_as_float

        @device
        def max_into(amax, stage, buf, q, hi_r, hi_s, hi_x, lo_s, lo_x, amsgrad):
            """``amax[buf, :, q] = max(it, hi over the lanes of block q)`` for the maxima
            ``hi_*`` and the low keys ``lo_*`` (``amax[buf, 3:5, q]``); all lanes call (xor
            shuffles, then one shared atomicMax per quantity from each block's first lane).
            """
            lane_mask = width // 2
            while lane_mask > 0:
                hi_r = max(hi_r, cuda.shfl_xor_sync(0xFFFFFFFF, hi_r, lane_mask))
                hi_s = max(hi_s, cuda.shfl_xor_sync(0xFFFFFFFF, hi_s, lane_mask))
                lo_s = max(lo_s, cuda.shfl_xor_sync(0xFFFFFFFF, lo_s, lane_mask))
                if amsgrad:
                    hi_x = max(hi_x, cuda.shfl_xor_sync(0xFFFFFFFF, hi_x, lane_mask))
                    lo_x = max(lo_x, cuda.shfl_xor_sync(0xFFFFFFFF, lo_x, lane_mask))
                lane_mask //= 2
            if cuda.laneid % width == 0:
                cuda.atomic.max(amax, (buf, 0, q), hi_r)
                cuda.atomic.max(amax, (buf, 1, q), hi_s)
                cuda.atomic.max(amax, (buf, 3, q), lo_s)
                if amsgrad:
                    cuda.atomic.max(amax, (buf, 2, q), hi_x)
                    cuda.atomic.max(amax, (buf, 4, q), lo_x)

    @device
    def root_of(code, absmax):
        """The decoded ``s`` of a code: its value on the block's map (the wide one where the
        stored absmax is negative) times ``|absmax|``."""
        return i2f(value_bits(code, absmax < zero)) * abs(absmax)

    @device
    def signed(code):
        """A uint8 code as the two's-complement byte it stores (-128..127), as int32."""
        return np.int32(np.int32(np.int32(code) ^ np.int32(0x80)) - np.int32(0x80))

    @device
    def abs_bits(x):
        """``bits(x) & 0x7FFFFFFF``: monotone in ``|x|``; NaN and Inf at ``0x7F800000`` up."""
        return np.int32(f2i(x) & np.int32(0x7FFFFFFF))

    @device
    def low_key(x):
        """``0x7FFFFFFF - bits(x)`` for ``x > 0``, else 0: its maximum gives the smallest
        positive ``x``."""
        b = abs_bits(x)
        return np.int32(sign_off - b) if b > no_code else no_code

    @device
    def is_wide(scale, low):
        """Whether a block of scale ``S`` and low-key maximum ``low`` goes wide: a positive
        ``s`` below ``S * 2**-13`` (:data:`adamnp.lowbit.sqrt.WIDE_BELOW`)."""
        return np.int32(sign_off - low) < abs_bits(scale * wide_factor)

    @device
    def scale_of(bits, floor):
        """The scale a block of maximum ``bits`` stores: the maximum raised to ``floor``, or 0
        (NaN and Inf give Inf or NaN: the block is not ok and stores NaN)."""
        return max(i2f(bits), floor) if bits > no_code else zero

    @device
    def multiplier(numerator, scale):
        """What a block's values are multiplied by: ``numerator / scale``, or ``numerator``."""
        return numerator / (scale if scale > zero else one)

    @kernel_jit
    def adam_step_q8_sqrt(
        ptrs, tiles, offsets, block_offsets,
        codes_m, codes_v, codes_w, absmax_m, absmax_v, absmax_w,
        k, decoupled_decay, l2_decay, amsgrad, maximize, key, s_key, phase, p_stochastic, p_key,
        index_base,
    ):  # fmt: skip
        """One 8-bit Adam/AdamW step of every leaf of a ``"sqrt"``-format group (``w`` is
        amsgrad's vmax, ``key`` the step's uint32 hash key, ``s_key`` and ``phase`` its
        :func:`~adamnp.lowbit.stochastic.root_keys`; ``p_stochastic``: round
        half-precision params stochastically with ``p_key``; element ``e`` of the buffers
        hashes as ``index_base + e``, int64)."""
        t = cuda.threadIdx.x
        q = t // group  # the thread's quantization block in each tile
        lane = t % group  # its first element in that block; then every group-th
        # (buffer, maxima of r/s/x and low keys of s/x, block)
        amax = cuda.shared.array((3, 5, qblocks), i32)
        stage = cuda.shared.array((5, stage_size), i32)  # the simulator's warp reduction
        if t < 5 * qblocks:
            amax[0, t // qblocks, t % qblocks] = 0
        cuda.syncthreads()
        new_r = cuda.local.array(per_thread, f32)  # decoded m, then r = m / s
        new_s = cuda.local.array(per_thread, f32)  # decoded s, then the new s = sqrt(v)
        new_x = cuda.local.array(per_thread, f32)  # amsgrad: decoded, then new sqrt(vmax)
        in_p = cuda.local.array(per_thread, f32)
        in_g = cuda.local.array(per_thread, f32)
        hashes = cuda.local.array(per_thread, types.uint32)
        buf = 0
        for c in range(cuda.blockIdx.x, tiles.shape[0], cuda.gridDim.x):
            leaf = tiles[c, 0]
            base = offsets[leaf]
            n = offsets[leaf + 1] - base
            hash_base = index_base + base  # the hash index of the leaf's first element
            first = tiles[c, 1] + q * bs  # first element of the thread's block
            b = min(block_offsets[leaf] + first // bs, block_offsets[leaf + 1] - 1)
            # Half params (and grads where ptrs[leaf, 2] says so) are read as uint16 bits.
            g_half = is_half and ptrs[leaf, 2] != 0
            p = ptr(ptrs[leaf, 0], 0 if is_half else n, absmax_m)
            p16 = bits(ptrs[leaf, 0], n if is_half else 0)
            g = ptr(ptrs[leaf, 1], 0 if g_half else n, absmax_m)
            g16 = bits(ptrs[leaf, 1], n if g_half else 0)
            pk0 = no_u
            pk1 = no_u
            p_low = no_u
            if is_half and p_stochastic:  # the block keys of the params' hashes, as below
                p0 = np.uint64(hash_base + first)
                p_low = np.uint32(p0 & low32)
                p_high = np.uint32(p0 >> high_shift)
                pk0 = p_hash_key(p_key, p_high)
                pk1 = p_hash_key(p_key, np.uint32(p_high + one32))
            nxt = buf + 1 if buf < 2 else 0
            if t < 5 * qblocks:
                amax[nxt, t // qblocks, t % qblocks] = 0
            # Load and decode without branches (indices clamped to the leaf).
            scale_s = absmax_v[b]
            scale_r = absmax_m[b] / levels
            for j in range(per_thread):
                i = min(first + j * group + lane, n - 1)
                e = np.uint64(base + i)
                in_p[j] = to_f32(p16[i], half) if is_half else p[i]
                in_g[j] = to_f32(g16[i], half) if g_half else g[i]
                root = root_of(codes_v[e], scale_s)
                new_s[j] = root
                new_r[j] = (f32(signed(codes_m[e])) * scale_r) * root
            if amsgrad:
                scale_x = absmax_w[b]
                for j in range(per_thread):
                    e = np.uint64(base + min(first + j * group + lane, n - 1))
                    new_x[j] = root_of(codes_w[e], scale_x)
            hi_r = np.int32(0)
            hi_s = np.int32(0)
            hi_x = np.int32(0)
            lo_s = np.int32(0)
            lo_x = np.int32(0)
            for j in range(per_thread):
                i = first + j * group + lane
                ratio = zero
                root = zero
                xroot = zero
                if i < n:
                    s0 = new_s[j]
                    v0 = s0 * s0
                    w0 = v0
                    if amsgrad:
                        x0 = new_x[j]
                        w0 = x0 * x0
                    pi, m, v, w = elem(
                        in_p[j], in_g[j], new_r[j], v0, w0,
                        k, decoupled_decay, l2_decay, amsgrad, maximize,
                    )  # fmt: skip
                    if is_half:
                        in_p[j] = pi  # rounded in a loop of its own (below)
                    else:
                        p[i] = pi
                    root = f32(math.sqrt(v))
                    ratio = zero if root == zero else m / root  # NaN root: NaN
                    if amsgrad:
                        xroot = f32(math.sqrt(w))
                new_r[j] = ratio
                new_s[j] = root
                new_x[j] = xroot
                hi_r = max(hi_r, abs_bits(ratio))
                hi_s = max(hi_s, abs_bits(root))
                hi_x = max(hi_x, abs_bits(xroot))
            if is_half:  # a loop of its own: the element loop stays unrolled
                for j in range(per_thread):
                    i = first + j * group + lane
                    if i < n:
                        u = no_u
                        if p_stochastic:
                            index = np.uint32(np.uint64(hash_base + i) & low32)
                            u = p_mix(np.uint32(index ^ (pk0 if index >= p_low else pk1)))
                        p16[i] = round_half(in_p[j], u, half, p_stochastic)
            # the low keys in a loop of their own: fewer registers live in the one above
            for j in range(per_thread):
                lo_s = max(lo_s, low_key(new_s[j]))
                lo_x = max(lo_x, low_key(new_x[j]))
            max_into(amax, stage, buf, q, hi_r, hi_s, hi_x, lo_s, lo_x, amsgrad)
            cuda.syncthreads()
            bits_r = amax[buf, 0, q]
            bits_s = amax[buf, 1, q]
            bits_x = amax[buf, 2, q]
            ok_r = bits_r < inf_bits
            ok_s = bits_s < inf_bits
            ok_x = bits_x < inf_bits
            stored_r = scale_of(bits_r, r_floor)
            stored_s = scale_of(bits_s, zero)
            stored_x = scale_of(bits_x, zero)
            mult_r = multiplier(levels, stored_r)
            mult_s = multiplier(one, stored_s)
            mult_x = multiplier(one, stored_x)
            wide_s = ok_s and is_wide(stored_s, amax[buf, 3, q])
            wide_x = ok_x and is_wide(stored_x, amax[buf, 4, q])
            # The block keys of the hash indices from the block's first on (it crosses at most
            # one multiple of 2**32), as the Numba kernels' block_keys.
            e0 = np.uint64(hash_base + first)
            low = np.uint32(e0 & low32)
            high = np.uint32(e0 >> high_shift)
            s_key0 = hash_key(s_key, high)
            s_key1 = hash_key(s_key, np.uint32(high + one32))
            # One loop per moment: each is fully unrolled at 16 elements per thread (the
            # merged body was not, which put the per-thread arrays in local memory). The
            # roots' draws (offset hash plus the step's phase) are kept for vmax.
            for j in range(per_thread):
                i = first + j * group + lane
                e = np.uint64(base + i)
                index = np.uint32(np.uint64(hash_base + i) & low32)
                h = mix(np.uint32(index ^ (s_key0 if index >= low else s_key1)))
                h = np.uint32((np.uint64(h) + np.uint64(phase)) & low32)  # wraps, quietly
                hashes[j] = h
                if i < n:
                    cs = encode_s(f2i(new_s[j] * mult_s), h, wide_s) if ok_s else no_code
                    codes_v[e] = np.uint8(cs)
            key0 = hash_key(key, high)
            key1 = hash_key(key, np.uint32(high + one32))
            for j in range(per_thread):
                i = first + j * group + lane
                if i < n:
                    e = np.uint64(base + i)
                    index = np.uint32(np.uint64(hash_base + i) & low32)
                    h = mix(np.uint32(index ^ (key0 if index >= low else key1)))
                    cr = encode_r(new_r[j] * mult_r, h) if ok_r else no_code
                    codes_m[e] = np.uint8(cr & np.int32(0xFF))
            if amsgrad:
                for j in range(per_thread):
                    i = first + j * group + lane
                    if i < n:
                        e = np.uint64(base + i)
                        cx = (
                            encode_s(f2i(new_x[j] * mult_x), hashes[j], wide_x) if ok_x else no_code
                        )
                        codes_w[e] = np.uint8(cx)
            if lane == 0 and first < n:
                absmax_m[b] = stored_r if ok_r else nan
                absmax_v[b] = (-stored_s if wide_s else stored_s) if ok_s else nan
                if amsgrad:
                    absmax_w[b] = (-stored_x if wide_x else stored_x) if ok_x else nan
            buf = nxt

    return SimpleNamespace(
        block_size=bs,
        half=half,
        threads=threads,
        tile=threads * per_thread,
        per_thread=per_thread,
        grid_cap=SIM_GRID if sim else None,
        adam_step_q8_sqrt=adam_step_q8_sqrt,
    )


def signatures(block_sizes=(64, 256, 1024, 4096), half: int = -1) -> dict:
    """``{name: (kernel, [argument types])}`` of the ``"sqrt"``-format kernels (PTX builds).

    Parameters
    ----------
    block_sizes : tuple of int
        The block sizes to list, one kernel each.
    half : int
        The parameters' format: -1 float32, 0 float16, 1 bfloat16.

    Returns
    -------
    dict
        ``adam_step_q8_sqrt_bs<block size>`` (``_f16`` or ``_bf16`` appended for half
        params) -> ``(kernel, [signature])``.
    """
    from numba.cuda import types

    table, ints, offs = types.uint64[:, ::1], types.int64[:, ::1], types.int64[::1]
    codes, f32a = types.uint8[::1], types.float32[::1]
    sig = (
        (table, ints, offs, offs) + (codes,) * 3 + (f32a,) * 3
        + (scalars_type(types.float32), *flags_types(), types.uint32, types.uint32, types.uint32)
        + (types.boolean, types.uint32, types.int64)
    )  # fmt: skip
    suffix = ("", "_f16", "_bf16")[half + 1]
    kernels = {bs: build(bs, half).adam_step_q8_sqrt for bs in block_sizes}
    return {f"adam_step_q8_sqrt_bs{bs}{suffix}": (kernel, [sig]) for bs, kernel in kernels.items()}
