"""AVX-512 table lookups in registers for the 8-bit kernel: no gathers.

LLVM vectorizes ``map[code]`` and the quantizer's table load into gathers, and on the CPUs
measured here a gather costs 1 - 1.5 cycles per element: four of them per element made the
8-bit step compute-bound (``docs/backends.md``). The two intrinsics below emit LLVM vector IR
that keeps every table in registers instead:

* :func:`dequant64`: ``out[i] = map[codes[i]] * scale`` for 64 codes. The 256 float32 map
  values are stored as four byte planes (`byte_planes`); each plane is looked up with two
  ``vpermi2b`` (128 entries each) and a blend on the code's top bit, and byte and word
  unpacks put the four bytes of each value together (the codes are permuted first so that
  the unpacks, which work inside 128-bit lanes, leave the values in order).
* :func:`requant64`: the codes of ``x[i] * (1 / absmax)`` for 64 values by the decade
  arithmetic of :func:`fast_code` (the same float32 operations, in the same
  order), with the 32-entry binade table looked up by ``vpermi2ps`` and the 16-entry decade
  tables by ``vpermps``. It returns a mask of the values it flagged; the caller recomputes
  those with the exact table quantizer.
* :func:`prefetch`: a cache-line prefetch hint (into L2), for the kernel's blocks ahead.
* :func:`fast_code`: the scalar twin of :func:`requant64`, for the tests and the sweep.

The lookups need AVX-512 F/BW/DQ/VBMI (Intel Ice Lake and later, AMD Zen 4 and later): `HAVE_VBMI`
says whether the CPU Numba compiles for has them, and :mod:`.q8` picks the kernel
accordingly (a CPU without them keeps the gather kernel; results are identical). Addresses
are raw integers (``array.ctypes.data``); loads and stores are unaligned. Compiled code only.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import config
from numba.extending import intrinsic

from ...lowbit.decades import _FIRST_EXP, _NEAR, DELTA

_I1, _I8, _I32 = ir.IntType(1), ir.IntType(8), ir.IntType(32)
_F32 = ir.FloatType()
_B64 = ir.VectorType(_I8, 64)
_I32x16 = ir.VectorType(_I32, 16)
_F32x16 = ir.VectorType(_F32, 16)
_I16x32 = ir.VectorType(ir.IntType(16), 32)
_REQUIRED = ("avx512f", "avx512bw", "avx512dq", "avx512vbmi")
_TINY = 127 - _FIRST_EXP  # magnitudes below 2**-31 are lifted to it (all have the zero code)


def _cpu_has_vbmi() -> bool:
    """Whether Numba compiles for a CPU with AVX-512 F, BW, DQ and VBMI."""
    name = (config.CPU_NAME or "host").lower()
    features = config.CPU_FEATURES
    if name == "host" and not features:
        from llvmlite import binding

        host = binding.get_host_cpu_features()
        return all(host.get(f, False) for f in _REQUIRED)
    # an explicit target (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES): only what is spelled out
    return all(f"+{f}" in (features or "").split(",") for f in _REQUIRED)


#: True when the in-register kernels can be used on the CPU Numba compiles for.
HAVE_VBMI = _cpu_has_vbmi()


def byte_planes(code) -> np.ndarray:
    """The 256 float32 values of ``code`` as a (4, 256) uint8 array: plane k = byte k.

    Examples
    --------
    >>> code = np.arange(256, dtype=np.float32)
    >>> planes = byte_planes(code)
    >>> np.array_equal(planes.T.copy().view(np.float32).ravel(), code)
    True
    """
    code = np.ascontiguousarray(code, dtype="<f4")
    return np.ascontiguousarray(code.view(np.uint8).reshape(256, 4).T)


def _declare(builder, name, ret, args):
    module = builder.module
    if name in module.globals:
        return module.globals[name]
    return ir.Function(module, ir.FunctionType(ret, args), name)


def _pointer(builder, address, element, offset=0):
    """``(element *) (address + offset)`` for an integer address and a byte offset."""
    if offset:
        address = builder.add(address, ir.Constant(address.type, offset))
    return builder.inttoptr(address, element.as_pointer())


def _load_table(builder, pointer):
    """Load a constant table vector, marked invariant so LLVM can hoist it out of loops."""
    value = builder.load(pointer, align=4)
    value.set_metadata("invariant.load", builder.module.add_metadata([]))
    return value


def _splat(builder, value, vector_type):
    lane0 = builder.insert_element(ir.Constant(vector_type, None), value, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(lane0, lane0, zeros)


def _concatenate(builder, parts):
    """One vector of 64 lanes from four vectors of 16."""
    mask = ir.VectorType(_I32, 32), ir.VectorType(_I32, 64)
    pairs = [
        builder.shuffle_vector(parts[i], parts[i + 1], ir.Constant(mask[0], list(range(32))))
        for i in (0, 2)
    ]
    return builder.shuffle_vector(pairs[0], pairs[1], ir.Constant(mask[1], list(range(64))))


def _pack_bytes(builder, parts):
    """Four vectors of 16 int32 as 64 bytes, in order, negative values as 0: 4 shuffles.

    ``vpackusdw`` and ``vpackuswb`` (identity on 0..255, saturating) work per 128-bit lane,
    which leaves dword ``4 * lane + k`` holding values ``16 k + 4 lane ... + 3``; one
    ``vpermd`` transposes that back (a ``vpmovdb`` per vector and three inserts would take 7
    shuffles).
    """
    words = _declare(builder, "llvm.x86.avx512.packusdw.512", _I16x32, [_I32x16, _I32x16])
    packb = _declare(builder, "llvm.x86.avx512.packuswb.512", _B64, [_I16x32, _I16x32])
    low, high = builder.call(words, parts[:2]), builder.call(words, parts[2:])
    packed = builder.bitcast(builder.call(packb, [low, high]), _I32x16)
    order = [4 * (d % 4) + d // 4 for d in range(16)]  # out dword 4k + lane <- in 4 lane + k
    return builder.bitcast(
        builder.shuffle_vector(packed, packed, ir.Constant(_I32x16, order)), _B64
    )


def _unpack(builder, a, b, bits, half):
    """``vpunpck{l,h}{bw,wd}``: the elements of `half` (0 low, 1 high) of each 128-bit lane of
    ``a`` and ``b`` (``bits``-bit elements), interleaved ``a0 b0 a1 b1 ...``."""
    n = a.type.count
    per_lane = 128 // bits
    order = []
    for lane in range(n // per_lane):
        for i in range(per_lane // 2):
            source = lane * per_lane + half * per_lane // 2 + i
            order += [source, n + source]
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, n), order))


def _address_args(*args):
    return all(isinstance(a, types.Integer) for a in args)


@intrinsic
def fma32(typingctx, a, b, c):
    """``fma32(a, b, c)``: ``a * b + c`` for float32, rounded once (``llvm.fma``; compiled code).

    The kernels otherwise never fuse (``fastmath`` is off): this is the scalar form of the
    quantizer's fused multiply-add (:func:`fast_code`; :func:`requant64` emits ``vfmadd``).
    """
    if not all(x == types.float32 for x in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        return builder.call(_declare(builder, "llvm.fma.f32", _F32, [_F32] * 3), args)

    return types.float32(a, b, c), codegen


def fast_code(bits, binades, lines, zero):
    """The code of a scaled value by decade arithmetic, and whether it must be checked.

    Parameters
    ----------
    bits : int
        The float32 bit pattern of the scaled value ``s`` (``|s| <= 1``), as a signed int32.
    binades, lines, zero
        The fields of :class:`~adamnp.lowbit.decades.DecadeTables` from
        :func:`~adamnp.lowbit.decades.build_decade_tables`.

    Returns
    -------
    code : int32
        The code; equal to the exact quantizer's unless `flag` is set.
    flag : bool
        True where ``s`` lies too close to a code or decade boundary for the arithmetic.

    Notes
    -----
    The scalar twin of :func:`requant64`, which performs the same float32 operations, in this
    order, on 16 lanes; for the sweep and the tests. Compiled code only (`fma32`).

    Examples
    --------
    >>> import numpy as np
    >>> import numba
    >>> from adamnp.quant import dynamic_map
    >>> from adamnp.lowbit.decades import build_decade_tables
    >>> t = build_decade_tables(dynamic_map(True))
    >>> bits = np.int32(np.float32(-0.5).view(np.int32))
    >>> code, flag = numba.njit(fast_code)(bits, t.binades, t.lines, t.zero)
    >>> int(code), bool(flag), int(np.abs(dynamic_map(True) + np.float32(0.5)).argmin())
    (35, False, 35)
    """
    a_bits = np.int32(bits & 0x7FFFFFFF)
    a = np.int32(a_bits).view(np.float32)
    entry = np.int32(binades[max(np.int32(a_bits >> 23) - _FIRST_EXP, 0) & 31])
    above = np.int32(a_bits - entry)  # >= 0 from 32 patterns below the boundary on
    d = np.int32(entry + (above >> 31)) & 15  # the decade above, or (-1) the one below
    near = np.uint32(above) <= np.uint32(2 * _NEAR)  # within _NEAR patterns of the boundary
    est = fma32(a, lines[0, d], lines[1, d])  # one rounding
    off = est - np.rint(est)  # distance to the nearest code boundary, exact
    flag = near or abs(off) < DELTA
    q = np.int32(min(est, lines[2, d]))  # truncation: est >= 0 wherever not flagged
    if bits < 0:
        code = np.int32(zero - min(q, zero))  # unsigned maps (zero 0): the code of 0.0
    else:
        code = np.int32(zero + q)
    return code, flag


@intrinsic
def dequant64(typingctx, codes_addr, planes_addr, out_addr, scale):
    """``dequant64(codes_addr, planes_addr, out_addr, scale)``: 64 float32 ``map[code] * scale``.

    ``codes_addr`` points at 64 uint8 codes, ``planes_addr`` at the (4, 256) uint8
    `byte_planes` of the map, ``out_addr`` at room for 64 float32. ``scale`` is float32; the
    product is rounded once, as ``map[code] * scale`` in float32.
    """
    if not (_address_args(codes_addr, planes_addr, out_addr) and scale == types.float32):
        return None
    sig = types.void(codes_addr, planes_addr, out_addr, scale)

    def codegen(context, builder, signature, args):
        codes_at, planes_at, out_at, scale = args
        permute = _declare(builder, "llvm.x86.avx512.vpermi2var.qi.512", _B64, [_B64] * 3)
        codes = builder.load(_pointer(builder, codes_at, _B64), align=1)
        # the unpacks below interleave within 128-bit lanes: output vector q, lane l, value k
        # comes from byte 16 l + 4 q + k of the planes, so the codes are put there first
        order = [16 * (t % 16 // 4) + 4 * (t // 16) + t % 4 for t in range(64)]
        index = builder.shuffle_vector(codes, codes, ir.Constant(ir.VectorType(_I32, 64), order))
        upper = builder.icmp_signed("<", index, ir.Constant(_B64, None))  # code >= 128
        planes = []
        for k in range(4):
            quarter = [
                _load_table(builder, _pointer(builder, planes_at, _B64, 256 * k + 64 * j))
                for j in range(4)
            ]
            low = builder.call(permute, [quarter[0], index, quarter[1]])
            high = builder.call(permute, [quarter[2], index, quarter[3]])
            planes.append(builder.select(upper, high, low))
        # the four bytes of each value: byte unpacks (planes 0, 1 and 2, 3) to words, word
        # unpacks to dwords (vpunpck{l,h}{bw,wd}: 8 shuffles for 64 values)
        words = [
            _unpack(builder, planes[a], planes[a + 1], 8, half) for half in (0, 1) for a in (0, 2)
        ]  # (low half: planes 0 1, planes 2 3), (high half: ...)
        factor = _splat(builder, scale, _F32x16)
        for q in range(4):
            pair = words[2 * (q // 2)], words[2 * (q // 2) + 1]
            value = _unpack(builder, builder.bitcast(pair[0], _I16x32),
                            builder.bitcast(pair[1], _I16x32), 16, q % 2)  # fmt: skip
            product = builder.fmul(builder.bitcast(value, _F32x16), factor)
            builder.store(product, _pointer(builder, out_at, _F32x16, 64 * q), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _requant_intrinsic(signed: bool):
    """`requant64` for a signed map, or `requant64_nonneg` (unsigned map, inputs >= 0)."""

    def requant(typingctx, x_addr, inverse, codes_addr, binades_addr, lines_addr, zero):
        if not _address_args(x_addr, codes_addr, binades_addr, lines_addr, zero):
            return None
        if inverse != types.float32:
            return None
        sig = types.uint64(x_addr, inverse, codes_addr, binades_addr, lines_addr, zero)
        return sig, functools.partial(_requant_codegen, signed)

    return intrinsic(requant)


def _requant_codegen(signed, context, builder, signature, args):
    x_at, inverse, codes_at, binades_at, lines_at, zero = args
    permute2 = _declare(
        builder, "llvm.x86.avx512.vpermi2var.ps.512", _F32x16, [_F32x16, _I32x16, _F32x16]
    )
    permute = _declare(builder, "llvm.x86.avx512.permvar.sf.512", _F32x16, [_F32x16, _I32x16])
    fma = _declare(builder, "llvm.fma.v16f32", _F32x16, [_F32x16] * 3)
    reduce = _declare(
        builder,
        "llvm.x86.avx512.mask.reduce.ps.512",
        _F32x16,
        [_F32x16, _I32, _F32x16, ir.IntType(16), _I32],
    )
    range_ = _declare(
        builder,
        "llvm.x86.avx512.mask.range.ps.512",
        _F32x16,
        [_F32x16, _F32x16, _I32, _F32x16, ir.IntType(16), _I32],
    )

    def const_i(v):
        return ir.Constant(_I32x16, [v] * 16)

    def const_f(v):
        return ir.Constant(_F32x16, [float(v)] * 16)

    binades = [_load_table(builder, _pointer(builder, binades_at, _F32x16, 64 * j)) for j in (0, 1)]
    scales, offsets, lasts = (
        _load_table(builder, _pointer(builder, lines_at, _F32x16, 64 * j)) for j in range(3)
    )
    factor = _splat(builder, inverse, _F32x16)
    zero_v = _splat(builder, context.cast(builder, zero, signature.args[5], types.int32), _I32x16)
    smallest = const_f(2.0**-_TINY)
    pieces, flags = [], []
    for j in range(4):
        x = builder.load(_pointer(builder, x_at, _F32x16, 64 * j), align=4)
        scaled = builder.fmul(x, factor)
        bits = builder.bitcast(scaled, _I32x16)
        # max(|s|, 2**-31) in one vrangeps (imm 0b1011: larger magnitude, sign cleared); the
        # tiny magnitudes it lifts all have the code of 0.0, as in `fast_code`
        every_lane, imm, current_rounding = ir.Constant(ir.IntType(16), -1), 0b1011, 4
        a = builder.call(
            range_,
            [scaled, smallest, ir.Constant(_I32, imm), const_f(0), every_lane,
             ir.Constant(_I32, current_rounding)],
        )  # fmt: skip
        a_bits = builder.bitcast(a, _I32x16)
        e = builder.lshr(a_bits, const_i(23))  # vpermi2ps reads its low 5 bits: E - 96
        entry = builder.bitcast(builder.call(permute2, [binades[0], e, binades[1]]), _I32x16)
        above = builder.sub(a_bits, entry)
        # vpermps reads the low 4 bits of d: the decade above the boundary, or the one below
        d = builder.add(entry, builder.ashr(above, const_i(31)))
        near = builder.icmp_unsigned("<=", above, const_i(2 * _NEAR))
        est = builder.call(fma, [a, builder.call(permute, [scales, d]),
                                 builder.call(permute, [offsets, d])])  # fmt: skip
        # vreduceps, imm 8: est - rint(est) (nearest, ties to even; no precision exception)
        every_lane = ir.Constant(ir.IntType(16), -1)
        off = builder.call(
            reduce, [est, ir.Constant(_I32, 8), const_f(0), every_lane, ir.Constant(_I32, 4)]
        )
        off_grid = builder.and_(
            builder.fcmp_ordered("<", off, const_f(DELTA)),
            builder.fcmp_ordered(">", off, const_f(-DELTA)),
        )
        flags.append(builder.or_(near, off_grid))
        last = builder.call(permute, [lasts, d])
        q = builder.fptosi(builder.select(builder.fcmp_ordered("<", est, last), est, last), _I32x16)
        if signed:  # zero + q, or zero - q below 0.0; the pack saturates what falls below 0
            negative = builder.icmp_signed("<", bits, const_i(0))
            q = builder.select(negative, builder.sub(zero_v, q), builder.add(zero_v, q))
        pieces.append(q)
    builder.store(_pack_bytes(builder, pieces), _pointer(builder, codes_at, _B64), align=1)
    return builder.bitcast(_concatenate(builder, flags), ir.IntType(64))


requant64 = _requant_intrinsic(signed=True)
requant64.__doc__ = """``requant64(x_addr, inverse, codes_addr, binades_addr, lines_addr, zero)``.

Writes the 64 uint8 codes of ``x[i] * inverse`` (``x_addr``: 64 float32; ``inverse``: float32
``1 / absmax``) computed as :func:`fast_code` does, with the tables of
:class:`~adamnp.lowbit.decades.DecadeTables` (``binades_addr``: 32 int32, ``lines_addr``: 3 x 16
float32; ``zero``: the code of 0.0). Returns a uint64 mask with bit ``i`` set where value ``i``
was flagged: its code may differ from the exact one, and the caller must recompute it.

The product is within 3 float32 ulps of the quotient ``x / absmax`` that defines the code (two
roundings more), and a multiply costs a fraction of a divide. That is safe because an
unflagged code is the exact code of every value within 4 ulps
(``tools/sweep_fast_quantizer.py`` checks all of them).
"""

requant64_nonneg = _requant_intrinsic(signed=False)
requant64_nonneg.__doc__ = """`requant64` for a map without negative values and ``x >= 0``.

The second moments are never negative (nor -0.0), so the sign handling can go; a negative
``x`` would get the code of its magnitude. ``zero`` must be 0.
"""


@intrinsic
def prefetch(typingctx, address):
    """``prefetch(address)``: ask for the cache line at ``address`` to be loaded into L2 (a hint).

    ``prefetcht1`` (locality 2), not into L1: the 8-bit step measured faster so (numbers in
    docs/backends.md, "Measurements behind the code").
    """
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i8p = _I8.as_pointer()
        fn = _declare(builder, "llvm.prefetch.p0", ir.VoidType(), [i8p, _I32, _I32, _I32])
        # read access, locality 2 (L2, prefetcht1), data cache
        builder.call(
            fn, [builder.inttoptr(args[0], i8p), *(ir.Constant(_I32, v) for v in (0, 2, 1))]
        )
        return context.get_dummy_value()

    return types.void(address), codegen
