"""The 8-bit step of the NumPy reference backend.

For each chunk of whole quantization blocks of a leaf: dequantize the moments with the old
absmax (:func:`adamnp.quant.dequantize_blockwise`), run exactly the float32 update of
:func:`adamnp.backends.numpy.update_chunk` on them, then requantize each moment with the new
absmax of its block (:func:`adamnp.quant.quantize_blockwise`). The parameter update uses the
unquantized float32 moments.

A block whose updated moment holds NaN or Inf (possible only with ``nonfinite="propagate"``)
is stored as absmax NaN with every code at the map's zero, so it dequantizes to NaN: the
non-finite value stays visible instead of being rounded into a finite code.

With ``v_rounding="stochastic"`` the codes of ``v`` are then rounded stochastically
(:mod:`._stochastic`, applied here to whole arrays).
"""

from __future__ import annotations

import numpy as np

from .. import quant
from ._scalars import kernel_scalars
from ._stochastic import block_key, gap_tables, group_key, uniform


def _requantize(x, code, zero_code, block_size, codes_out, absmax_out) -> None:
    """Quantize ``x`` (whole blocks, the last may be partial) into the given outputs."""
    n = x.size
    nb = absmax_out.size
    full = n // block_size
    ok = np.ones(nb, bool)
    if full:
        ok[:full] = np.isfinite(x[: full * block_size].reshape(full, block_size)).all(axis=1)
    if nb > full:
        ok[full] = np.isfinite(x[full * block_size :]).all()
    if ok.all():
        quant._quantize_into(x, code, block_size, codes_out, absmax_out, backend="numpy")
        return
    bad = np.repeat(~ok, block_size)[:n]
    clean = np.where(bad, np.float32(0), x)
    quant._quantize_into(clean, code, block_size, codes_out, absmax_out, backend="numpy")
    absmax_out[~ok] = np.nan
    codes_out[bad] = zero_code


def round_stochastic(x, code, block_size, codes, absmax, key, index0) -> None:
    """Stochastic rounding of ``codes`` (the nearest codes of ``x``) in place.

    ``index0`` is the index of ``x[0]`` in its group's buffer; ``key`` the step's
    :func:`~._stochastic.step_key`. Blocks with a non-finite absmax keep their codes.
    """
    n = x.size
    divisor = np.where(absmax > 0, absmax, np.float32(1))
    s = x * np.repeat(np.float32(1) / divisor, block_size)[:n]
    c = codes.astype(np.int32)
    d = s - code[c]
    up, down = gap_tables(code)
    gap = np.where(d >= 0, up[c], down[c])
    index = np.arange(index0, index0 + n, dtype=np.uint64)
    u = uniform(block_key(key, index >> np.uint64(32)), index & np.uint64(0xFFFFFFFF))
    move = (u * gap < np.abs(d)).astype(np.int32)
    finite = np.repeat(np.isfinite(absmax), block_size)[:n]
    codes[finite] = (c + np.where(d >= 0, move, -move))[finite]


def step_q8(group, params, grads, scalars) -> None:
    """Update every leaf of an 8-bit ``group`` in place."""
    from .numpy import CHUNK, update_chunk

    k = kernel_scalars(scalars, np.float32)
    bs = group.block_size
    chunk = max(bs, CHUNK // bs * bs)
    names = ("m", "v", "vmax") if scalars.amsgrad else ("m", "v")
    maps = {x: quant.dynamic_map(x == "m") for x in names}  # signed map for m only
    zeros = {x: int(np.flatnonzero(maps[x] == 0)[0]) for x in names}
    t1 = np.empty(chunk, np.float32)
    t2 = np.empty(chunk, np.float32)
    scratch = {x: np.empty(chunk, np.float32) for x in names}
    buf = group.buffers
    key = group_key(group, scalars.step)  # None: v rounded to nearest
    for j, leaf in enumerate(group.leaf_ids):
        p = params[leaf].reshape(-1)
        g = grads[leaf].reshape(-1)
        e0, b0 = int(group.offsets[j]), int(group.block_offsets[j])
        for lo in range(0, p.size, chunk):
            hi = min(lo + chunk, p.size)
            n = hi - lo
            blo, bhi = b0 + lo // bs, b0 + -(-hi // bs)
            codes = {x: buf[f"codes_{x}"][e0 + lo : e0 + hi] for x in names}
            absmax = {x: buf[f"absmax_{x}"][blo:bhi] for x in names}
            moments = {x: scratch[x][:n] for x in names}
            for x in names:
                quant._dequantize_into(codes[x], absmax[x], maps[x], bs, moments[x], "numpy")
            update_chunk(
                p[lo:hi], g[lo:hi], moments["m"], moments["v"], moments.get("vmax"),
                k, scalars, t1[:n], t2[:n],
            )  # fmt: skip
            for x in names:
                _requantize(moments[x], maps[x], zeros[x], bs, codes[x], absmax[x])
            if key is not None:
                round_stochastic(moments["v"], maps["v"], bs, codes["v"], absmax["v"], key,
                                 e0 + lo)  # fmt: skip
