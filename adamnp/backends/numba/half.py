"""Numba CPU kernels for float16 and bfloat16 parameters: the fused step, helpers, a probe.

Numba has no float16 on the CPU and no bfloat16 at all, so half-precision leaves are read and
written as ``uint16`` bits through their data addresses and converted with the scalar
functions of :mod:`adamnp.lowbit.half`: exact upcast to float32, the update in float32,
rounding back to nearest or stochastically (the element's hash: :func:`~.quant.index_hash`
with :func:`~adamnp.lowbit.half.param_key` of its hash index, the group's ``index_base`` plus
its index in the group's buffers), the bits of the reference
(:class:`adamnp.backends.numpy._HalfParams`).

:func:`step_half` is the float32-moment step of a half-precision
:class:`~adamnp._state.LeafGroup`, one pass over memory like :func:`.fp32.step_fp32`, reading
``p`` (2 bytes), ``g`` (2 or 4 bytes: each leaf's gradient may be half or float32), ``m``,
``v`` and writing ``p``, ``m``, ``v``. Its loop (:func:`update_half`, also the small path's)
upcasts each element, updates it in float32 and rounds it back, so the CPU converts while it
waits on the update's divisions and square root; only a half gradient in a group that also
has float32 gradients goes through a float32 scratch. The 8-bit kernels (:mod:`.q8`,
:mod:`.q8_sqrt`) upcast ``p`` per chunk into a scratch with :func:`load_half` (through
:func:`chunk_f32`) and round it back with :func:`store_half`: their update loops are shared
with float32 params, and converting inside them made the float32 kernels compile 0.3 - 0.9 s
longer. A kernel's ``fmt`` argument (:func:`format_tag`) selects the conversions of its
format and rounding at compile time.

The scalar conversions are compiled functions that the loops call, not Numba-inlined code:
LLVM inlines and vectorizes them the same, and each is compiled once instead of once per
call site (docs/backends.md, First use).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import config
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic, overload

from ...lowbit import half as fmt
from .finite import LIMIT_BF16, LIMIT_F16, f32_bits_nonfinite, half_bits_nonfinite
from .fp32 import CHECK_ONLY, read_traffic
from .quant import block_keys, index_hash
from .schedule import launch_traffic
from .util import as_pointer, elem, jit

bf16_to_f32 = jit()(fmt.bf16_to_f32)
bf16_round = jit()(fmt.bf16_round)
_f16_to_f32_bits = jit()(fmt.f16_to_f32)
_f16_round_bits = jit()(fmt.f16_round)


def _compiles_for_f16c() -> bool:
    """Whether Numba compiles for a CPU with F16C, x86's float16 <-> float32 instructions
    (every x86 CPU with AVX2 has them): the host's features, or ``NUMBA_CPU_FEATURES``."""
    features = config.CPU_FEATURES
    if features is None:
        features = get_host_cpu_features()
    return "+f16c" in features.split(",")


#: float16 conversions by the CPU's instructions (LLVM's ``fpext``/``fptrunc`` of ``half``)
#: rather than the bit arithmetic of :mod:`adamnp.lowbit.half`. Both are exact IEEE
#: conversions (rounding to nearest even, subnormals, overflow to Inf), so they give the same
#: bits except for NaN payloads: :func:`f16_round` gives the quiet NaN as the reference
#: does, and :func:`f16_to_f32` quiets a signalling NaN, which no result can tell
#: (tests/test_half_numba.py checks both on every float16 value and on float32 patterns
#: across the range, and the half steps against the reference). Without F16C, LLVM would
#: call a conversion routine that Numba does not link, so other CPUs keep the bit arithmetic.
HARDWARE_F16 = _compiles_for_f16c()


@intrinsic
def _f16_value(typingctx, h):
    """``_f16_value(h)``: the float32 value of the float16 bits ``h`` (uint16)."""
    if not isinstance(h, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        bits = builder.trunc(args[0], ir.IntType(16)) if h.bitwidth > 16 else args[0]
        return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())

    return types.float32(h), codegen


@intrinsic
def _f16_nearest(typingctx, x):
    """``_f16_nearest(x)``: the float16 bits (uint16) of float32 ``x``, to nearest even."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        half = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(half, ir.IntType(16))

    return types.uint16(types.float32), codegen


if HARDWARE_F16:

    @jit()
    def f16_to_f32(h):
        """:func:`adamnp.lowbit.half.f16_to_f32`, by the CPU's conversion, which makes a
        signalling NaN quiet (sets the top bit of its payload). No result can tell: every
        upcast value goes through float32 arithmetic, which quiets it the same way, or
        through a finiteness test or a rounding back (to the quiet NaN). Keeping the
        signalling bit costs a select that halves the conversion loop's speed."""
        return _f16_value(np.uint16(h))

    @jit()
    def f16_nearest(x):
        """The bits of the float16 nearest to ``x`` by the CPU's conversion (a NaN made the
        quiet NaN with its sign, as :func:`adamnp.lowbit.half.f16_round` does)."""
        bits = np.uint32(_f16_nearest(np.float32(x)))
        nan = np.uint32(np.uint32(bits & np.uint32(0x8000)) | np.uint32(0x7E00))
        return nan if x != x else bits

    @jit()
    def f16_round(x, u, stochastic):
        """:func:`adamnp.lowbit.half.f16_round`: the nearest float16 by the CPU's
        conversion, stochastic rounding by bits."""
        if stochastic:
            return _f16_round_bits(x, u, stochastic)
        return f16_nearest(x)

else:
    f16_to_f32 = _f16_to_f32_bits
    f16_round = _f16_round_bits

    @jit()
    def f16_nearest(x):
        """The bits of the float16 nearest to ``x`` (:func:`adamnp.lowbit.half.f16_round`)."""
        return _f16_round_bits(x, np.uint32(0), False)


_ONE = np.uint32(1)
#: Elements per piece of :func:`step_half` where it upcasts a half gradient into a float32
#: scratch that stays in L1.
PIECE = 1024


@jit()
def to_f32(h, half):
    """:func:`adamnp.lowbit.half.to_f32` of the bits ``h`` (format ``half``: 0 or 1)."""
    return bf16_to_f32(np.uint32(h)) if half == 1 else f16_to_f32(np.uint32(h))


#: A kernel's ``fmt`` argument: the parameters' format (float16, bfloat16) and rounding
#: (nearest, stochastic) as the *type* of a NumPy scalar, ``_FORMAT_TAGS[half][stochastic]``.
#: Numba compiles a kernel once per argument type, so a state compiles the conversion loops
#: of its own format and rounding only: as runtime values, all four loops were compiled
#: into every kernel (docs/backends.md, First use).
_FORMAT_TAGS = ((np.int8, np.int16), (np.uint8, np.uint16))
_TAGS = tuple(tuple(t(0) for t in pair) for pair in _FORMAT_TAGS)
_TAG_VARIANTS = {
    types.int8: (0, False),
    types.int16: (0, True),
    types.uint8: (1, False),
    types.uint16: (1, True),
}


def format_tag(half: int, stochastic: bool) -> np.generic:
    """The ``fmt`` argument of the half-precision kernels for format ``half`` (0 float16, 1
    bfloat16) and stochastic or nearest rounding.

    Examples
    --------
    >>> format_tag(1, False).dtype, format_tag(0, True).dtype
    (dtype('uint8'), dtype('int16'))
    """
    return _TAGS[half][bool(stochastic)]


def _variant(fmt) -> tuple[int, bool]:
    if fmt not in _TAG_VARIANTS:
        raise numba.errors.TypingError(f"a half-precision format tag, not {fmt}")
    return _TAG_VARIANTS[fmt]


def tag_format(fmt):
    """The format (0 float16, 1 bfloat16) of the tag ``fmt``, a constant (compiled code
    only)."""
    raise NotImplementedError("tag_format runs in compiled code only")


@overload(tag_format, inline="always")
def _tag_format(fmt):
    half = _variant(fmt)[0]
    return lambda fmt: half


# One loop per format and rounding: a kernel compiles the one its tag names. The upcasts and
# the roundings to nearest are inlined by Numba (a function of their own cost about 0.1 s
# more to compile), the stochastic roundings are called (inlined with their hash: 0.25 s
# more). They round with update_half's primitives (bf16_round, _f16_round_bits, index_hash);
# written through its element overloads (param_value, param_bits) they compiled 0.15 - 0.3 s
# longer.
@jit(inline="always")
def _load_f16(bits, out, n):
    for i in range(n):
        out[i] = f16_to_f32(np.uint32(bits[i]))


@jit(inline="always")
def _load_bf16(bits, out, n):
    for i in range(n):
        out[i] = bf16_to_f32(np.uint32(bits[i]))


@jit(inline="always")
def _store_f16(bits, x, n, key, h):
    for i in range(n):
        bits[i] = np.uint16(f16_nearest(x[i]))


@jit(inline="always")
def _store_bf16(bits, x, n, key, h):
    for i in range(n):
        bits[i] = np.uint16(bf16_round(x[i], np.uint32(0), False))


@jit()
def _store_f16_stochastic(bits, x, n, key, h):
    key0, key1, low = block_keys(key, h)
    index = low
    for i in range(n):
        u = index_hash(index, key0, key1, low)
        index = np.uint32(index + _ONE)
        bits[i] = np.uint16(_f16_round_bits(x[i], u, True))


@jit()
def _store_bf16_stochastic(bits, x, n, key, h):
    key0, key1, low = block_keys(key, h)
    index = low
    for i in range(n):
        u = index_hash(index, key0, key1, low)
        index = np.uint32(index + _ONE)
        bits[i] = np.uint16(bf16_round(x[i], u, True))


_LOADS = (_load_f16, _load_bf16)
_STORES = ((_store_f16, _store_f16_stochastic), (_store_bf16, _store_bf16_stochastic))


def load_half(address, n, fmt, out):
    """Upcast the ``n`` half values at ``address`` into ``out[:n]`` (compiled code only):
    the format of the tag ``fmt`` (:func:`format_tag`)."""
    raise NotImplementedError("load_half runs in compiled code only")


@overload(load_half, inline="always")
def _load_half(address, n, fmt, out):
    load = _LOADS[_variant(fmt)[0]]

    def impl(address, n, fmt, out):
        load(numba.carray(as_pointer(address, np.uint16), n), out, n)

    return impl


@intrinsic
def data_address(typingctx, array):
    """``data_address(array)``: the address of the array's first element (compiled code
    only). A call, not an attribute: inside a parallel loop, ``array.ctypes`` counts as an
    alias and costs the loop body its ``noalias`` arguments."""
    if not isinstance(array, types.Array):
        return None
    sig = types.int64(array)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, ir.IntType(64))

    return sig, codegen


@jit(inline="always")
def chunk_f32(address, lo, n, fmt, upcast, scratch):
    """Elements ``lo .. lo + n - 1`` of the leaf at ``address`` as a float32 array: with
    ``upcast``, the half values of the format of the tag ``fmt`` (:func:`format_tag`) upcast
    into the float32 scratch at address ``scratch``, which the caller keeps alive; else a
    view of a float32 leaf. One definition of the result, by address."""
    at = scratch if upcast else address + lo * 4
    out = numba.carray(as_pointer(at, np.float32), n)
    if upcast:
        load_half(address + lo * 2, n, fmt, out)
    return out


def store_half(address, x, n, fmt, key, h):
    """Round ``x[:n]`` into the ``n`` half values at ``address`` (compiled code only): the
    format and rounding of the tag ``fmt`` (:func:`format_tag`).

    To nearest, or stochastically with the hashes of the hash indices ``h .. h + n - 1``
    (the group's ``index_base`` plus the elements' indices in its buffers) under the step's
    parameter ``key`` (:func:`~adamnp.lowbit.half.param_key`).
    """
    raise NotImplementedError("store_half runs in compiled code only")


@overload(store_half, inline="always")
def _store_half(address, x, n, fmt, key, h):
    half, stochastic = _variant(fmt)
    store = _STORES[half][stochastic]

    def impl(address, x, n, fmt, key, h):
        store(numba.carray(as_pointer(address, np.uint16), n), x, n, key, h)

    return impl


def param_keys(fmt, key, h):
    """The hash keys ``(key0, key1, low)`` of the elements from hash index ``h`` on
    (:func:`~.quant.block_keys`) under the step's parameter ``key`` for the tag ``fmt``
    (:func:`format_tag`) of stochastic rounding; zeros, with no hashing compiled, for
    rounding to nearest (compiled code only)."""
    raise NotImplementedError("param_keys runs in compiled code only")


@overload(param_keys, inline="always")
def _param_keys(fmt, key, h):
    if _variant(fmt)[1]:
        return lambda fmt, key, h: block_keys(key, h)
    zero = np.uint32(0)
    return lambda fmt, key, h: (zero, zero, zero)


def param_value(bits, fmt):
    """The float32 value of the half-precision ``bits`` of the tag ``fmt``'s format (compiled
    code only)."""
    raise NotImplementedError("param_value runs in compiled code only")


@overload(param_value, inline="always")
def _param_value(bits, fmt):
    if _variant(fmt)[0] == 1:
        return lambda bits, fmt: bf16_to_f32(np.uint32(bits))
    return lambda bits, fmt: f16_to_f32(np.uint32(bits))


def param_bits(x, index, fmt, keys):
    """The bits (uint16) of float32 ``x`` rounded to the tag ``fmt``'s format and rounding:
    stochastically with the hash of the element whose hash index has the low 32 bits
    ``index`` under ``keys`` (:func:`param_keys`), as :func:`store_half` rounds (compiled
    code only)."""
    raise NotImplementedError("param_bits runs in compiled code only")


@jit()
def _bf16_stochastic_bits(x, index, key0, key1, low):
    return np.uint16(bf16_round(x, index_hash(index, key0, key1, low), True))


@jit()
def _f16_stochastic_bits(x, index, key0, key1, low):
    return np.uint16(_f16_round_bits(x, index_hash(index, key0, key1, low), True))


# The stochastic roundings are called functions (LLVM inlines them): inlined by Numba, the
# hash's branch left a variable out of scope in the kernel's IR (NumbaIRAssumptionWarning).
@overload(param_bits, inline="always")
def _param_bits(x, index, fmt, keys):
    half, stochastic = _variant(fmt)
    if stochastic:
        bits = _bf16_stochastic_bits if half == 1 else _f16_stochastic_bits
        return lambda x, index, fmt, keys: bits(x, index, keys[0], keys[1], keys[2])
    if half == 1:
        return lambda x, index, fmt, keys: np.uint16(bf16_round(x, np.uint32(0), False))
    return lambda x, index, fmt, keys: np.uint16(f16_nearest(x))


def grad_value(g, i, fmt):
    """Element ``i`` of the gradient ``g`` as float32: ``g`` holds float32 values, or the
    bits (uint16) of the tag ``fmt``'s format, upcast (compiled code only)."""
    raise NotImplementedError("grad_value runs in compiled code only")


@overload(grad_value, inline="always")
def _grad_value(g, i, fmt):
    if g.dtype == types.uint16:
        return lambda g, i, fmt: param_value(g[i], fmt)
    return lambda g, i, fmt: g[i]


@jit(inline="always")
def update_half(p, g, m, v, vmax, a, b, k, decoupled, l2, maximize, fmt, key, h):
    """:func:`.fp32._update` of the half-precision bits ``p`` (uint16, the tag ``fmt``'s
    format and rounding, :func:`format_tag`) in one loop: each element is upcast, updated
    in float32 and rounded back (stochastically with the hash of hash index ``h + i`` under
    the step's parameter ``key``), the bits of :func:`load_half`, the float32 update and
    :func:`store_half` one after the other. ``g`` holds float32 values or the bits of the
    parameters' format (:func:`grad_value`). ``vmax`` as
    :func:`.fp32._update`'s (one loop compiled). One loop lets the CPU convert while it
    waits on the update's divisions and square root, which loops over a float32 scratch did
    not."""
    m, v = m[a:b], v[a:b]
    keys = param_keys(fmt, key, h)
    index = keys[2]
    if vmax is None:
        for i in range(p.size):
            x, m[i], v[i], _ = elem(
                param_value(p[i], fmt), grad_value(g, i, fmt), m[i], v[i], m[i], k,
                decoupled, l2, False, maximize,
            )  # fmt: skip
            p[i] = param_bits(x, index, fmt, keys)
            index = np.uint32(index + _ONE)
    else:
        y = vmax[a:b]
        for i in range(p.size):
            x, m[i], v[i], y[i] = elem(
                param_value(p[i], fmt), grad_value(g, i, fmt), m[i], v[i], y[i], k,
                decoupled, l2, True, maximize,
            )  # fmt: skip
            p[i] = param_bits(x, index, fmt, keys)
            index = np.uint32(index + _ONE)


def grad_kinds(grads_half: np.ndarray) -> np.ndarray | None:
    """The ``g_half`` argument of :func:`step_half` from a group's per-leaf gradient kinds
    (1: the parameters' format, 0: float32): None when every gradient is half, else the
    kinds.

    Examples
    --------
    >>> grad_kinds(np.int8([1, 1])) is None
    True
    >>> grad_kinds(np.int8([1, 0]))
    array([1, 0], dtype=int8)
    """
    return None if grads_half.all() else grads_half


@jit()
def step_half(table, leaf_ids, offsets, p_addr, g_addr, g_half, m, v, vmax, k, flags, fmt,
              key, index_base, check):  # fmt: skip
    """Update all chunks of ``table`` in place: a half-precision group with float32 moments;
    -1, or with ``check`` the tree index of the first leaf whose gradient is non-finite,
    with nothing written.

    Arguments as :func:`.fp32.step_fp32`'s (``vmax`` as there), plus the
    gradients' kinds (:func:`grad_kinds`: ``g_half`` None when every gradient is of the
    parameters' format, else per leaf 1 for such a gradient and 0 for a float32 one), the
    tag ``fmt`` of the parameters' format and rounding
    (:func:`format_tag`) and the step's parameter ``key``
    (:func:`~adamnp.lowbit.half.param_key`); element ``e`` of the buffers hashes as
    ``index_base + e`` (int64). ``check`` as :func:`.fp32.step_fp32`'s, with the test of
    :func:`.reduce.first_nonfinite` (a half gradient: NaN or Inf, for bfloat16 also a
    magnitude at or above the float32 limit).

    With half gradients only, each chunk is one :func:`update_half` loop on the bits.
    Otherwise a half gradient is upcast into a float32 scratch by pieces of :data:`PIECE`
    elements that stay in L1, for the same loop on float32 gradients. A state compiles the
    one of the two it runs (the branches on ``g_half`` are decided before typing).
    """
    decoupled, l2, _, maximize = flags  # amsgrad: vmax is not None
    if check:
        limit = LIMIT_BF16 if tag_format(fmt) == 1 else LIMIT_F16
        for c in range(table.shape[0]):  # the first bad chunk in table order: its leaf
            j, lo, hi = table[c, 0], table[c, 1], table[c, 2]
            at = g_addr[leaf_ids[j]]
            bad = False
            if g_half is None:
                bad = half_bits_nonfinite(at + lo * 2, hi - lo, limit)
            else:
                if g_half[j]:
                    bad = half_bits_nonfinite(at + lo * 2, hi - lo, limit)
                else:
                    bad = f32_bits_nonfinite(at + lo * 4, hi - lo)
            if bad:
                return leaf_ids[j]
        if check == CHECK_ONLY:
            return -1
    for c in range(table.shape[0]):
        j, lo, hi = table[c, 0], table[c, 1], table[c, 2]
        leaf = leaf_ids[j]
        if g_half is None:  # one fused loop on the bits
            a = offsets[j] + lo
            p = numba.carray(as_pointer(p_addr[leaf] + lo * 2, np.uint16), hi - lo)
            g = numba.carray(as_pointer(g_addr[leaf] + lo * 2, np.uint16), hi - lo)
            update_half(p, g, m, v, vmax, a, a + hi - lo, k, decoupled, l2, maximize, fmt, key,
                        index_base + a)  # fmt: skip
        else:  # float32 gradients, half ones upcast by pieces
            gs = np.empty(PIECE, np.float32)
            for s in range(lo, hi, PIECE):
                w = min(PIECE, hi - s)
                a = offsets[j] + s
                p = numba.carray(as_pointer(p_addr[leaf] + s * 2, np.uint16), w)
                if g_half[j]:
                    g = gs[:w]
                    load_half(g_addr[leaf] + s * 2, w, fmt, g)
                else:
                    g = numba.carray(as_pointer(g_addr[leaf] + s * 4, np.float32), w)
                update_half(p, g, m, v, vmax, a, a + w, k, decoupled, l2, maximize, fmt, key,
                            index_base + a)  # fmt: skip
    return -1


@jit()
def _traffic_half_chunk(p, g, m, v):
    for i in range(p.size):
        h = g[i]
        x = np.float32(h)
        m[i] = m[i] + x
        v[i] = v[i] + x
        p[i] = np.uint16(p[i] + h)


@jit()
def _traffic_half(table, p, g, m, v):
    for c in range(table.shape[0]):
        lo, hi = table[c, 1], table[c, 2]
        _traffic_half_chunk(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi])


def traffic_kernel_half(
    p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, *, check_pass: bool = False
) -> None:
    """Move the bytes of a half-precision step without its math: on the bits, ``p += g``,
    ``m += g``, ``v += g``.

    ``p`` and ``g`` are 2-byte arrays (float16, bfloat16 or uint16; read as bits), ``m`` and
    ``v`` float32: it reads ``p, g, m, v`` and writes ``p, m, v`` (22 bytes per element) with
    the chunking of :func:`.fp32.traffic_kernel`. The step time of float32 moments and half
    gradients over this kernel's time on the same arrays says how close that step runs to the
    memory bandwidth. ``check_pass`` reads ``g`` once before (:func:`.fp32.read_traffic`, 24
    bytes per element), as a step with ``nonfinite="raise"`` does.

    Examples
    --------
    >>> p, g = np.ones(5, np.float16), np.zeros(5, np.float16)
    >>> m, v = np.ones(5, np.float32), np.zeros(5, np.float32)
    >>> traffic_kernel_half(p, g, m, v, check_pass=True)
    >>> p, m
    (array([1., 1., 1., 1., 1.], dtype=float16), array([1., 1., 1., 1., 1.], dtype=float32))
    """
    if check_pass:
        read_traffic(g)
    bits = (a.reshape(-1).view(np.uint16) for a in (p, g))
    launch_traffic(_traffic_half, *bits, m.reshape(-1), v.reshape(-1))
