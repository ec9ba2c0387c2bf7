"""Numba CPU kernel of the fused multi-tensor 8-bit step in the ``"sqrt"`` format.

The format (:mod:`adamnp.lowbit.sqrt`) needs no table: a code of ``sqrt(v)`` stands for a
float32 bit pattern (:func:`~adamnp.lowbit.sqrt.s_bits`) and one of ``m / sqrt(v)`` for a
signed byte times a per-block scale, so decoding is a few integer operations and multiplies,
and encoding a division and integer arithmetic on the quotient's bits. Everything vectorizes
without gathers, on any x86-64 or Arm CPU.

Like :mod:`.q8`, ``prange`` runs over chunks of whole blocks, and each block takes two passes
over L1-resident data: (1) decode, :func:`~adamnp.backends.math.adam_elem` inlined, write
``p``, keep ``s = sqrt(v)`` and ``r = m / s`` (and amsgrad's ``sqrt(vmax)``) in a scratch and
take their block maxima as integer maxima of bit patterns; (2) encode with the element's two
hashes (:func:`~.quant.index_hash` of its hash index, the group's ``index_base`` plus its
index in the group's buffers, under the step's key for ``r`` and under the offset key plus
the step's phase for ``s``, :func:`~adamnp.lowbit.stochastic.root_keys`). The order of
operations is the reference's (:func:`adamnp.lowbit.sqrt.requantize_into`), without
fast-math: params, codes and absmax equal it bit for bit, whatever the number of threads.
"""

from __future__ import annotations

import numba
import numpy as np

from ...lowbit import sqrt as fmt
from .half import chunk_f32, data_address, store_half
from .quant import block_keys, index_hash
from .util import as_pointer, elem, jit

# Called, not Numba-inlined: LLVM inlines and vectorizes them the same, and Numba compiles each
# once instead of copying its IR into every call site (2.8 -> 1.8 s of the kernel's compile).
s_code = jit()(fmt.s_code)
s_bits = jit()(fmt.s_bits)
r_code = jit()(fmt.r_code)

_SIGN_OFF = np.int32(0x7FFFFFFF)
_INF_BITS = np.int32(0x7F800000)
_LEVELS = np.float32(127)
_R_FLOOR = np.float32(fmt.R_FLOOR)
_ONE = np.float32(1)
_ZERO = np.float32(0)
_WIDE_FACTOR = np.float32(fmt.WIDE_FACTOR)


@jit(inline="always")
def _abs_bits(x):
    return np.int32(np.float32(x).view(np.int32) & _SIGN_OFF)


@jit(inline="always")
def _root(code, absmax):
    """The decoded ``s`` of a code: its value on the block's map (the wide one where the
    stored absmax is negative) times ``|absmax|``."""
    return np.int32(s_bits(code, absmax < _ZERO)).view(np.float32) * abs(absmax)


@jit(inline="always")
def _low_key(x):
    """``0x7FFFFFFF - bits(x)`` for ``x > 0``, else 0: its maximum over a block gives the
    smallest positive ``x`` (:func:`_wide`)."""
    b = _abs_bits(x)
    return np.int32(_SIGN_OFF - b) if b > np.int32(0) else np.int32(0)


@jit(inline="always")
def _wide(top_bits, low_key):
    """Whether a block of largest ``s`` (bits) and :func:`_low_key` maximum stores its ``s``
    on the wide map: a positive ``s`` below ``S * 2**-13``
    (:data:`~adamnp.lowbit.sqrt.WIDE_BELOW`)."""
    limit = _abs_bits(np.int32(top_bits).view(np.float32) * _WIDE_FACTOR)
    return np.int32(_SIGN_OFF - low_key) < limit


@jit(inline="always")
def _ratio(m, root):
    """``m / root``, but 0 where ``root`` is 0 (a NaN root gives NaN)."""
    q = m / root
    return np.float32(0) if root == np.float32(0) else q


@jit(inline="always")
def _update_block(p, g, s, n, codes_m, codes_v, e, am, av, sr, ss, k, decoupled, l2,
                  maximize):  # fmt: skip
    """Pass 1 over the ``n`` elements of one block (without amsgrad); returns the bits of the
    block maxima of ``|r|`` and ``s`` and the :func:`_low_key` maximum of ``s``. Unsigned
    offsets, no slices (see :mod:`.q8`)."""
    s = np.uint64(s)
    e = np.uint64(e)
    rscale = am / _LEVELS
    xr = np.int32(0)
    xs = np.int32(0)
    ls = np.int32(0)
    for i in range(np.uint64(0), np.uint64(n)):
        sq = _root(codes_v[e + i], av)
        m0 = (np.float32(np.int8(codes_m[e + i])) * rscale) * sq
        v0 = sq * sq
        p[s + i], m, v, _ = elem(p[s + i], g[s + i], m0, v0, v0, k, decoupled, l2, False,
                                 maximize)  # fmt: skip
        root = np.sqrt(v)
        r = _ratio(m, root)
        sr[i], ss[i] = r, root
        xr = max(xr, _abs_bits(r))
        xs = max(xs, _abs_bits(root))
        ls = max(ls, _low_key(root))
    return xr, xs, ls


@jit(inline="always")
def _update_block_amsgrad(p, g, s, n, codes_m, codes_v, codes_x, e, am, av, ax, sr, ss, sx,
                          k, decoupled, l2, maximize):  # fmt: skip
    """:func:`_update_block` with amsgrad's ``vmax``: also keeps ``sqrt(vmax)`` and returns
    its block maximum's bits and :func:`_low_key` maximum after those of ``s``."""
    s = np.uint64(s)
    e = np.uint64(e)
    rscale = am / _LEVELS
    xr = np.int32(0)
    xs = np.int32(0)
    xx = np.int32(0)
    ls = np.int32(0)
    lx = np.int32(0)
    for i in range(np.uint64(0), np.uint64(n)):
        sq = _root(codes_v[e + i], av)
        xq = _root(codes_x[e + i], ax)
        m0 = (np.float32(np.int8(codes_m[e + i])) * rscale) * sq
        p[s + i], m, v, x = elem(p[s + i], g[s + i], m0, sq * sq, xq * xq, k, decoupled,
                                 l2, True, maximize)  # fmt: skip
        root = np.sqrt(v)
        r = _ratio(m, root)
        xroot = np.sqrt(x)
        sr[i], ss[i], sx[i] = r, root, xroot
        xr = max(xr, _abs_bits(r))
        xs = max(xs, _abs_bits(root))
        xx = max(xx, _abs_bits(xroot))
        ls = max(ls, _low_key(root))
        lx = max(lx, _low_key(xroot))
    return xr, xs, ls, xx, lx


@jit(inline="always")
def _scale(bits, numerator, floor):
    """``(absmax to store, multiplier, ok)`` of a block maximum given as bits."""
    ok = bits < _INF_BITS
    scale = max(np.int32(bits).view(np.float32), floor) if bits > 0 else np.float32(0)
    mult = numerator / (scale if bits > 0 else np.float32(1))
    return (scale if ok else np.float32(np.nan)), mult, ok


@jit(inline="always")
def _scale_root(bits, low_key):
    """:func:`_scale` of a block of ``s`` (or ``sqrt(vmax)``) from its maximum's bits and
    :func:`_low_key` maximum: ``(absmax to store, negative on the wide map; multiplier; ok;
    wide)``."""
    scale, mult, ok = _scale(bits, _ONE, _ZERO)
    wide = _wide(bits, low_key) and ok
    return (-scale if wide else scale), mult, ok, wide


@jit(inline="always")
def _zero_codes(codes, e, n):
    for i in range(np.uint64(0), np.uint64(n)):
        codes[e + i] = np.uint8(0)


@jit(inline="always")
def _encode_block(sr, ss, sx, n, codes_m, codes_v, codes_x, e, h, absmax_m, absmax_v,
                  absmax_x, b, br, bs, ls, bx, lx, key, s_key, phase):  # fmt: skip
    """Pass 2: store block ``b``'s absmax and codes of ``m`` and ``v`` (and, where ``sx`` is
    not None, amsgrad's ``vmax`` from ``sx``, ``bx`` and ``lx``, with ``v``'s draws)
    (:mod:`adamnp.lowbit.sqrt`, steps 2-4); the block's first element is ``codes_*[e]``, of
    hash index ``h``; ``key`` the step's hash key (the ratios), ``s_key`` and ``phase`` its
    :func:`~adamnp.lowbit.stochastic.root_keys` (the roots). ``sx`` is None without amsgrad:
    Numba then drops its code.

    The hot loop has no branch (a NaN/Inf block's codes are zeroed after it) and counts the
    index in uint32 (:func:`~.quant.index_hash`)."""
    absmax_m[b], mult_r, ok_r = _scale(br, _LEVELS, _R_FLOOR)
    absmax_v[b], mult_s, ok_s, wide = _scale_root(bs, ls)
    if sx is not None:
        absmax_x[b], mult_x, ok_x, wide_x = _scale_root(bx, lx)
    key0, key1, low = block_keys(key, h)
    s_key0, s_key1, _ = block_keys(s_key, h)
    e = np.uint64(e)
    index = low
    for i in range(np.uint64(0), np.uint64(n)):
        h = index_hash(index, key0, key1, low)
        h_s = np.uint32(index_hash(index, s_key0, s_key1, low) + phase)
        index = np.uint32(index + np.uint32(1))
        codes_v[e + i] = np.uint8(s_code(np.float32(ss[i] * mult_s).view(np.int32), h_s, wide))
        codes_m[e + i] = np.uint8(r_code(np.float32(sr[i] * mult_r), h) & 0xFF)
        if sx is not None:
            x_bits = np.float32(sx[i] * mult_x).view(np.int32)
            codes_x[e + i] = np.uint8(s_code(x_bits, h_s, wide_x))
    if not ok_s:
        _zero_codes(codes_v, e, n)
    if not ok_r:
        _zero_codes(codes_m, e, n)
    if sx is not None:
        if not ok_x:
            _zero_codes(codes_x, e, n)


# Each kernel comes in two versions, without and with amsgrad, each compiling only its own
# blocks: a runtime amsgrad flag made Numba compile (and inline) both, which doubled the cold
# compile of the common case (docs/backends.md, First use).


@jit()
def _chunk(p, g, j, lo, hi, offsets, block_offsets, block_size, codes, absmax, k, flags, key,
           s_key, phase, index_base):  # fmt: skip
    """Both passes over every block of one chunk (``p`` and ``g`` its float32 values), without
    amsgrad. A call, not inlined: the kernels share its compiled code, and Numba's inlining of
    it into each took seconds of compile time (one call per chunk of up to 32768 elements)."""
    decoupled, l2, _, maximize = flags
    codes_m, codes_v, codes_x = codes
    absmax_m, absmax_v, absmax_x = absmax
    sr = np.empty(block_size, np.float32)
    ss = np.empty(block_size, np.float32)
    b = block_offsets[j] + lo // block_size
    for s in range(0, hi - lo, block_size):
        n = min(block_size, hi - lo - s)
        e = offsets[j] + lo + s
        br, bs, ls = _update_block(p, g, s, n, codes_m, codes_v, e, absmax_m[b], absmax_v[b],
                                   sr, ss, k, decoupled, l2, maximize)  # fmt: skip
        _encode_block(sr, ss, None, n, codes_m, codes_v, codes_x, e, index_base + e, absmax_m,
                      absmax_v, absmax_x, b, br, bs, ls, 0, 0, key, s_key, phase)  # fmt: skip
        b += 1


@jit()
def _chunk_amsgrad(p, g, j, lo, hi, offsets, block_offsets, block_size, codes, absmax, k,
                   flags, key, s_key, phase, index_base):  # fmt: skip
    """:func:`_chunk` with amsgrad's ``vmax``."""
    decoupled, l2, _, maximize = flags
    codes_m, codes_v, codes_x = codes
    absmax_m, absmax_v, absmax_x = absmax
    sr = np.empty(block_size, np.float32)
    ss = np.empty(block_size, np.float32)
    sx = np.empty(block_size, np.float32)
    b = block_offsets[j] + lo // block_size
    for s in range(0, hi - lo, block_size):
        n = min(block_size, hi - lo - s)
        e = offsets[j] + lo + s
        br, bs, ls, bx, lx = _update_block_amsgrad(
            p, g, s, n, codes_m, codes_v, codes_x, e, absmax_m[b], absmax_v[b], absmax_x[b],
            sr, ss, sx, k, decoupled, l2, maximize,
        )  # fmt: skip
        _encode_block(sr, ss, sx, n, codes_m, codes_v, codes_x, e, index_base + e, absmax_m,
                      absmax_v, absmax_x, b, br, bs, ls, bx, lx, key, s_key, phase)  # fmt: skip
        b += 1


@jit()
def step_q8_sqrt(table, leaf_ids, offsets, block_offsets, block_size, p_addr, g_addr, codes,
                 absmax, k, flags, key, s_key, phase, index_base):  # fmt: skip
    """Update all chunks of ``table`` in place: float32 params and grads (arguments as
    :func:`.q8.step_q8`'s, without maps: ``codes = (m, v, vmax)`` and ``absmax = (m, v,
    vmax)``, the vmax entries empty; ``key`` the step's hash key; element ``e`` of the
    buffers hashes as ``index_base + e``). Without amsgrad: :func:`step_q8_sqrt_amsgrad`
    is the kernel with it."""
    for c in range(table.shape[0]):
        j, lo, hi = table[c, 0], table[c, 1], table[c, 2]
        p = numba.carray(as_pointer(p_addr[leaf_ids[j]] + lo * 4, np.float32), hi - lo)
        g = numba.carray(as_pointer(g_addr[leaf_ids[j]] + lo * 4, np.float32), hi - lo)
        _chunk(p, g, j, lo, hi, offsets, block_offsets, block_size, codes, absmax, k, flags,
               key, s_key, phase, index_base)  # fmt: skip


@jit()
def step_q8_sqrt_amsgrad(table, leaf_ids, offsets, block_offsets, block_size, p_addr, g_addr,
                         codes, absmax, k, flags, key, s_key, phase, index_base):  # fmt: skip
    """:func:`step_q8_sqrt` with amsgrad (the vmax entries of ``codes`` and ``absmax``)."""
    for c in range(table.shape[0]):
        j, lo, hi = table[c, 0], table[c, 1], table[c, 2]
        p = numba.carray(as_pointer(p_addr[leaf_ids[j]] + lo * 4, np.float32), hi - lo)
        g = numba.carray(as_pointer(g_addr[leaf_ids[j]] + lo * 4, np.float32), hi - lo)
        _chunk_amsgrad(p, g, j, lo, hi, offsets, block_offsets, block_size, codes, absmax, k,
                       flags, key, s_key, phase, index_base)  # fmt: skip


@jit(inline="always")
def _upcast(p_addr, g_addr, leaf, lo, n, fmt, g_half):
    """``(scratch, p, g)``: the chunk's params and grads as float32 views of one scratch."""
    scratch = np.empty(2 * n, np.float32)
    at = data_address(scratch)
    p = chunk_f32(p_addr[leaf], lo, n, fmt, True, at)
    g = chunk_f32(g_addr[leaf], lo, n, fmt, g_half != 0, at + n * 4)
    return scratch, p, g


@jit()
def step_q8_sqrt_half(table, leaf_ids, offsets, block_offsets, block_size, p_addr, g_addr,
                      codes, absmax, k, flags, key, s_key, phase, fmt, g_half, p_key,
                      index_base):  # fmt: skip
    """:func:`step_q8_sqrt` for float16 or bfloat16 params (the format and rounding of the tag
    ``fmt``, :func:`~.half.format_tag`), with grads of that format where ``g_half[j]`` (else
    float32): each chunk is upcast into a scratch and rounded back after its blocks
    (stochastically: under the parameter key ``p_key``). A
    kernel of its own: its conversions would more than double the float32 kernel's compile
    time."""
    for c in range(table.shape[0]):
        j, lo, hi = table[c, 0], table[c, 1], table[c, 2]
        scratch, p, g = _upcast(p_addr, g_addr, leaf_ids[j], lo, hi - lo, fmt, g_half[j])
        _chunk(p, g, j, lo, hi, offsets, block_offsets, block_size, codes, absmax, k, flags,
               key, s_key, phase, index_base)  # fmt: skip
        store_half(p_addr[leaf_ids[j]] + lo * 2, scratch, hi - lo, fmt, p_key,
                   index_base + offsets[j] + lo)  # fmt: skip


@jit()
def step_q8_sqrt_half_amsgrad(table, leaf_ids, offsets, block_offsets, block_size, p_addr,
                              g_addr, codes, absmax, k, flags, key, s_key, phase, fmt,
                              g_half, p_key, index_base):  # fmt: skip
    """:func:`step_q8_sqrt_half` with amsgrad."""
    for c in range(table.shape[0]):
        j, lo, hi = table[c, 0], table[c, 1], table[c, 2]
        scratch, p, g = _upcast(p_addr, g_addr, leaf_ids[j], lo, hi - lo, fmt, g_half[j])
        _chunk_amsgrad(p, g, j, lo, hi, offsets, block_offsets, block_size, codes, absmax, k,
                       flags, key, s_key, phase, index_base)  # fmt: skip
        store_half(p_addr[leaf_ids[j]] + lo * 2, scratch, hi - lo, fmt, p_key,
                   index_base + offsets[j] + lo)  # fmt: skip
