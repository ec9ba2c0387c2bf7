"""`convert_state`: a copy of a state with other layout options (float32 <-> 8-bit moments,
another 8-bit format or block size, other opt-outs, another backend).

The moments are decoded and encoded by the formats' own functions
(:mod:`adamnp.lowbit.sqrt`, :mod:`adamnp.lowbit.reference`), on the host, a chunk of whole
blocks at a time; device state is copied to the host and back.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np

from . import backends
from ._state import AdamState, Fp32Slot, amsgrad_of, build_groups
from ._validate import validate_layout, warn_layout
from .lowbit import reference as bnb
from .lowbit import sqrt
from .lowbit.maps import moment_map, zero_code
from .lowbit.stochastic import group_key, root_keys

#: Elements per conversion chunk: whole blocks of every block size (64..4096).
CHUNK = 1 << 16


def convert_state(
    state: AdamState,
    *,
    state_bits: int | None = None,
    state_format: str | None = None,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    keep_fp32: Collection[str] | Callable[[str, object], bool] | None = None,
    v_rounding: str | None = None,
    backend: str | None = None,
) -> AdamState:
    """A new state holding ``state``'s moments with other layout options.

    Switch a running job from float32 to 8-bit moments (to save memory) or back, change the
    8-bit format or block size, or move the state to another backend. The result has the
    same config(s), labels, step count, ``skipped_steps``, paths, tree structure, shapes and
    dtypes; its layout is the one :func:`adamnp.init` builds with the options given. The
    source state is not modified.

    Parameters
    ----------
    state : AdamState
        From :func:`adamnp.init`, :func:`adamnp.load_state` or an earlier conversion, on
        any backend.
    state_bits, state_format, block_size, min_8bit_size, keep_fp32, v_rounding
        As in :func:`adamnp.init`. None: as in ``state.layout``, except ``v_rounding`` when
        ``state_format`` changes: the new format's default then (``"stochastic"`` for
        ``"sqrt"``, ``"nearest"`` for ``"bnb"``). A state made by :func:`adamnp.init` with
        default options records init's defaults, so ``convert_state(state, state_bits=8)``
        of it gives what ``init(..., state_bits=8)`` would. ``keep_fp32=()`` opts no leaf
        out; a predicate ``keep_fp32(path, array)`` gets a read-only stand-in with the
        leaf's shape and dtype (there are no params here).
    backend : {"numpy", "numba", "cuda", "auto"}, optional
        Where the new state lives. None: ``state.backend``. ``"auto"``: ``"numba"`` when it
        runs here, else ``"numpy"`` (name ``"cuda"`` to move host state to the GPU).

    Returns
    -------
    AdamState
        A new state; it shares no buffers with ``state``.

    Raises
    ------
    TypeError, ValueError
        ``state`` is not an :class:`AdamState`, or a bad option (the same errors as
        :func:`adamnp.init`, naming the option); nothing is allocated.
    RuntimeError
        ``backend`` cannot run here.

    Warns
    -----
    UserWarning
        ``state_bits=8`` but no leaf gets 8-bit moments (as :func:`adamnp.init`).

    Notes
    -----
    Each leaf's moments go from their storage in ``state`` to their storage in the result:

    * full precision to full precision, and 8-bit to 8-bit with the same format and block
      size: copied, bit for bit;
    * 8-bit to full precision: the decoded values, bit for bit what a step decodes
      (:func:`adamnp.lowbit.sqrt.dequantize_into`; for ``"bnb"`` the map value times the
      block's absmax);
    * to 8-bit from anything else: the float32 moments (decoded first if they were 8-bit)
      are encoded as the format stores them after a step, by the same functions:
      ``"sqrt"`` by :func:`adamnp.lowbit.sqrt.requantize_into`, stochastically;
      ``"bnb"`` to nearest (``v`` then rounded stochastically if ``v_rounding`` says so).
      amsgrad's ``vmax`` is converted like ``v``.

    float16 and bfloat16 leaves have float32 full-precision moments and may have 8-bit
    ones: they convert exactly as float32 leaves with the same moments do (the param's
    dtype only names the leaf's group).

    Stochastic rounding uses the hash key of the step the state is at: the key
    (:func:`adamnp.lowbit.stochastic.group_key`) and element indices that step
    ``state.step`` of the new state's leaf group would have used. So the conversion is
    deterministic, and converting to 8-bit after a float32 step gives the codes an 8-bit
    step from the same moments would have stored. The next step draws with the next key.

    The conversion runs on the host, one chunk of :data:`CHUNK` elements at a time, holding
    ``state``'s lock (a concurrent :func:`adamnp.step` waits). A CUDA state is copied to
    the host leaf by leaf; a CUDA result is built on the host group by group and copied to
    the device.

    Examples
    --------
    >>> import numpy as np, adamnp
    >>> params = {"w": np.ones(8192, np.float32), "b": np.ones(8, np.float32)}
    >>> grads = {"w": np.linspace(-1, 1, 8192, dtype=np.float32), "b": np.ones(8, np.float32)}
    >>> state = adamnp.init(params, adamnp.adamw(lr=1e-3), backend="numpy")
    >>> adamnp.step(params, grads, state)
    >>> small = adamnp.convert_state(state, state_bits=8)
    >>> small.step, [type(s).__name__ for s in small.slots]  # "b" is below min_8bit_size
    (1, ['Fp32Slot', 'QuantSlot'])
    >>> state.nbytes(), small.nbytes()
    (65600, 16704)
    >>> adamnp.step(params, grads, small)  # training goes on with 8-bit moments
    >>> small.step
    2

    Back to float32: the moments are the decoded 8-bit values, exactly; ``sqrt(v)`` is
    within one gap of the ``"sqrt"`` format's map (at most 1/16) of the float32 one:

    >>> full = adamnp.convert_state(adamnp.convert_state(state, state_bits=8), state_bits=32)
    >>> s32, s8 = np.sqrt(state.slots[1].v), np.sqrt(full.slots[1].v)
    >>> full.state_bits, bool(np.all(np.abs(s8 / s32 - 1) <= 1 / 16))
    (32, True)
    """
    if not isinstance(state, AdamState):
        raise TypeError(f"state must be an AdamState, got {type(state).__name__}")
    with state._lock:  # one consistent step of the source
        old = state.layout
        fmt = old.state_format if state_format is None else state_format
        if v_rounding is None and fmt == old.state_format:
            v_rounding = old.v_rounding
        stand_ins = [
            np.broadcast_to(np.zeros((), d), s) for s, d in zip(state.shapes, state.dtypes)
        ]
        layout = validate_layout(
            state.paths,
            stand_ins,
            state_bits=old.state_bits if state_bits is None else state_bits,
            state_format=fmt,
            block_size=old.block_size if block_size is None else block_size,
            min_8bit_size=old.min_8bit_size if min_8bit_size is None else min_8bit_size,
            v_rounding=v_rounding,
            keep_fp32=old.keep_fp32 if keep_fp32 is None else keep_fp32,
        )
        warn_layout(layout, state.paths, state.shapes, state.dtypes)
        name = backends.resolve(state.backend if backend is None else backend)
        be = backends.get(name)
        amsgrad = amsgrad_of(state.config, state.configs)
        slots, groups = build_groups(
            state.paths, state.shapes, state.dtypes, layout, amsgrad, be, state.labels
        )
        source = backends.get(state.backend)
        for group in groups:
            _fill(group, state, source, be)
        return AdamState(
            config=state.config,
            backend=name,
            step=state.step,
            skipped_steps=state.skipped_steps,
            treedef=state.treedef,
            paths=state.paths,
            shapes=state.shapes,
            dtypes=state.dtypes,
            slots=slots,
            groups=groups,
            layout=layout,
            labels=state.labels,
            configs=None if state.configs is None else dict(state.configs),
        )


def _host(be, a) -> np.ndarray:
    """``a`` itself if it is a host array (never written), else a host copy."""
    return a if isinstance(a, np.ndarray) else be.to_host(a)


def _fill(group, state: AdamState, source, be) -> None:
    """Write the moments of every leaf of the new ``group`` from the leaves of ``state``."""
    staged = {
        name: buf if isinstance(buf, np.ndarray) else np.empty(buf.shape, buf.dtype)
        for name, buf in group.buffers.items()
    }
    key = group_key(group, state.step)  # None: no stochastic rounding
    roots = root_keys(group, state.step)
    for j, leaf in enumerate(group.leaf_ids):
        slot = state.slots[leaf]
        arrays = {f: _host(source, a).reshape(-1) for f, a in _fields(slot).items()}
        e0, e1 = int(group.offsets[j]), int(group.offsets[j + 1])
        b0 = int(group.block_offsets[j]) if group.kind == "q8" else 0
        if _same_storage(group, slot, state.state_format):  # copy the stored form
            for f, a in arrays.items():
                lo = b0 if f.startswith("absmax_") else e0
                staged[f][lo : lo + a.size] = a
            continue
        for lo in range(0, e1 - e0, CHUNK):
            hi = min(lo + CHUNK, e1 - e0)
            moments = _decode(slot, state.state_format, arrays, lo, hi)
            if group.kind == "fp32":
                for x, values in moments.items():
                    staged[x][e0 + lo : e0 + hi] = values
            else:
                _encode(group, staged, moments, (key, roots), e0 + lo,
                        b0 + lo // group.block_size)  # fmt: skip
    for name, buf in group.buffers.items():
        if staged[name] is not buf:
            be.copy_from_host(buf, staged[name])


def _fields(slot) -> dict:
    """The slot's arrays by buffer name (``m``, ``v``, ``vmax`` or ``codes_m``, ...)."""
    arrays = {
        f: getattr(slot, f) for f in slot._fields if f not in ("block_size", "map_m", "map_v")
    }
    return {f: a for f, a in arrays.items() if a is not None}


def _same_storage(group, slot, fmt: str) -> bool:
    """Whether ``slot`` (of a state in 8-bit format ``fmt``) is stored as ``group`` stores."""
    if isinstance(slot, Fp32Slot):
        return group.kind == "fp32"
    return group.kind == "q8" and (group.state_format, group.block_size) == (fmt, slot.block_size)


def _decode(slot, fmt: str, arrays: dict, lo: int, hi: int) -> dict:
    """Float32 (or float64) moments of elements ``lo:hi`` of one leaf (whole blocks)."""
    if isinstance(slot, Fp32Slot):
        return {x: arrays[x][lo:hi] for x in arrays}
    bs = slot.block_size
    names = [f[6:] for f in arrays if f.startswith("codes_")]
    codes = {x: arrays[f"codes_{x}"][lo:hi] for x in names}
    absmax = {x: arrays[f"absmax_{x}"][lo // bs : -(-hi // bs)] for x in names}
    out = {x: np.empty(hi - lo, np.float32) for x in names}
    if fmt == "sqrt":
        sqrt.dequantize_into(codes, absmax, bs, out)
    else:
        for x in names:
            bnb.dequantize_into(codes[x], absmax[x], moment_map(x), bs, out[x])
    return out


def _encode(group, staged: dict, moments: dict, keys, e: int, b: int) -> None:
    """Store ``moments`` (whole blocks from element ``e``, block ``b`` of the group) as the
    group's 8-bit format stores them after a step (:mod:`adamnp.backends.numpy`); ``keys``
    are the step's ``(group_key, root_keys)``."""
    key, roots = keys
    bs = group.block_size
    n = moments["m"].size
    codes = {x: staged[f"codes_{x}"][e : e + n] for x in moments}
    absmax = {x: staged[f"absmax_{x}"][b : b + -(-n // bs)] for x in moments}
    h = group.index_base + e  # the hash index of element e (the backends')
    if group.state_format == "sqrt":
        sqrt.requantize_into(moments["m"], moments["v"], moments.get("vmax"), codes, absmax,
                             bs, key, h, roots)  # fmt: skip
        return
    for x, values in moments.items():
        qmap = moment_map(x)
        bnb.requantize_into(values, qmap, zero_code(qmap), bs, codes[x], absmax[x])
    if key is not None:  # v_rounding="stochastic"
        bnb.round_stochastic(moments["v"], moment_map("v"), bs, codes["v"], absmax["v"], key, h)
