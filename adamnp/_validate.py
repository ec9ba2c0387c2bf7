"""Every check that runs before :func:`adamnp.init` builds a state or :func:`adamnp.step`
changes anything: the leaves, aliasing, the layout options and the gradients' values.

Each error is a ``TypeError`` or ``ValueError`` naming the leaf or option at fault; nothing
here modifies params or state.

Examples
--------
>>> import numpy as np, adamnp
>>> p = np.zeros(3, np.float32)
>>> state = adamnp.init(p, adamnp.adam(), backend="numpy")
>>> validate_step(p, np.zeros(3, np.float64), state)
Traceback (most recent call last):
  ...
TypeError: grads has dtype float64, expected float32
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Collection
from itertools import repeat
from operator import attrgetter, itemgetter
from typing import NamedTuple

import numpy as np

from . import backends
from ._config import AdamConfig
from ._dlpack import bfloat16_view
from ._state import AdamState, Layout
from ._tree import first_difference, flatten
from .backends.math import GRAD_LIMIT_EXP, compute_dtype, square_bound
from .lowbit.half import half_format, typestr_dtype
from .lowbit.maps import STATE_FORMATS
from .lowbit.reference import is_block_size

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_FLOAT32 = np.dtype(np.float32)


def is_param_dtype(dtype) -> bool:
    """Whether adamnp updates arrays of ``dtype``: float32, float64, float16 or bfloat16
    (``ml_dtypes.bfloat16``).

    Examples
    --------
    >>> is_param_dtype(np.float16), is_param_dtype(np.int32)
    (True, False)
    """
    return np.dtype(dtype) in FLOAT_DTYPES or half_format(dtype) >= 0


def grad_dtype_ok(grad_dtype, param_dtype) -> bool:
    """Whether a gradient of ``grad_dtype`` fits a leaf of ``param_dtype``: the same dtype,
    or float32 for a float16 or bfloat16 leaf (which is updated in float32 anyway)."""
    return grad_dtype == param_dtype or (grad_dtype == _FLOAT32 and half_format(param_dtype) >= 0)


# -- one leaf


def dtype_shape(a) -> tuple[np.dtype, tuple]:
    """dtype and shape of a leaf; device arrays report them through their CUDA interface
    (a PyTorch tensor's ``dtype`` is not a NumPy dtype).

    Examples
    --------
    >>> dtype_shape(np.zeros((2, 3), np.float32))
    (dtype('float32'), (2, 3))
    """
    cai = None if isinstance(a, np.ndarray) else getattr(a, "__cuda_array_interface__", None)
    if cai is not None:
        return typestr_dtype(cai["typestr"]), tuple(int(d) for d in cai["shape"])
    return np.dtype(a.dtype), tuple(int(d) for d in a.shape)


def as_base_array(a):
    """``a`` itself, or a base ``ndarray`` view of its memory: for an ndarray subclass, and
    for a CPU object exporting DLPack, the buffer protocol or the array interface (a torch
    CPU tensor, an array-API array, ``array.array``); anything else is returned as it is.

    This is the one policy for foreign leaves, on every backend: a leaf that is an
    ``ndarray`` subclass (``np.matrix``, ``np.memmap``, an array type with its own
    ``__array_ufunc__``) is updated in place as the plain array of its memory, never through
    the subclass's methods or ufunc overrides, and an object of another library through a
    zero-copy NumPy view (:func:`host_view`). Masked arrays are refused before this
    (:func:`leaf_error`).

    Examples
    --------
    >>> class Unit(np.ndarray): ...
    >>> a = np.zeros(3).view(Unit)
    >>> type(as_base_array(a)).__name__, np.shares_memory(as_base_array(a), a)
    ('ndarray', True)
    """
    if type(a) is np.ndarray:
        return a
    if isinstance(a, np.ndarray):
        return np.ndarray.view(a, np.ndarray)  # not a.view: a subclass may override view
    view, _ = host_view(a)
    return a if view is None else view


def host_view(a) -> tuple[np.ndarray | None, str]:
    """A zero-copy NumPy view of a CPU array of another library, or ``(None, why not)``.

    Tried in order: DLPack (``__dlpack__`` on a CPU device, :func:`numpy.from_dlpack`, or for
    bfloat16, which NumPy refuses, :func:`adamnp._dlpack.bfloat16_view`), the array interface
    (``__array_interface__``) and the buffer protocol (``memoryview``). The
    view is read-only where the producer says so (DLPack 1.0's read-only flag, a read-only
    buffer). CUDA device arrays and NumPy arrays are not handled here.

    Examples
    --------
    >>> import array
    >>> buf = array.array("f", [1.0, 2.0])
    >>> view, _ = host_view(buf)
    >>> view[0] = 5.0
    >>> buf[0], view.dtype
    (5.0, dtype('float32'))
    >>> host_view(3.0)
    (None, 'it exports neither DLPack, the array interface nor the buffer protocol')
    """
    if isinstance(a, np.ndarray) or backends.is_device_array(a):
        return None, "it is not a foreign CPU array"
    if hasattr(a, "__dlpack__"):
        try:
            device = a.__dlpack_device__()[0]
        except Exception:
            device = None
        if device == 1:  # kDLCPU
            try:
                return np.from_dlpack(a), ""
            except Exception as exc:
                view, why = bfloat16_view(a)  # NumPy has no bfloat16 of its own
                if view is not None:
                    return view, ""
                # not about bfloat16 (why is empty): NumPy's reason is the one
                return None, f"NumPy cannot import it through DLPack ({why or exc})"
        elif device is not None:
            return None, f"it lives on DLPack device type {device}, not the CPU"
    if hasattr(a, "__array_interface__"):
        return np.asarray(a), ""
    try:
        return np.asarray(memoryview(a)), ""
    except TypeError:
        return None, "it exports neither DLPack, the array interface nor the buffer protocol"


def _type_name(a) -> str:
    return f"{type(a).__module__}.{type(a).__qualname__}"


def _is_jax(a) -> bool:
    return type(a).__module__.split(".")[0] in ("jax", "jaxlib")


_JAX_HINT = (
    "which is immutable: adamnp updates params in place. Keep params as NumPy arrays and "
    "pass them to JAX as jnp.asarray(p); gradients from JAX are fine (read without a copy)"
)


def _not_an_array(path: str, a, why: str) -> TypeError:
    """The error for a leaf that is no array adamnp can use, with what to do instead."""
    text = f"{path} is a {_type_name(a)}, not an array adamnp can update in place: {why}"
    if "require" in why and "grad" in why:
        text += ". Pass the tensor detached (p.detach() shares its memory)"
    elif "bfloat16" in str(getattr(a, "dtype", "")) and "ml_dtypes" not in why:
        text += (
            ". NumPy has no bfloat16 of its own: view the bits as ml_dtypes.bfloat16 "
            "(for a torch tensor t: t.view(torch.int16).numpy().view(ml_dtypes.bfloat16), "
            "which shares t's memory)"
        )
    return TypeError(
        text + ". Leaves are NumPy arrays or CPU objects exporting DLPack or the buffer protocol"
    )


def _read_only(path: str, a, original) -> ValueError:
    """The error for params that cannot be written, naming the foreign type if any."""
    if original is a or isinstance(original, np.ndarray):
        return ValueError(f"{path} is read-only; params are updated in place")
    if _is_jax(original):
        return ValueError(f"{path} is a {_type_name(original)}, {_JAX_HINT}")
    return ValueError(
        f"{path} is a {_type_name(original)} exported read-only; params are updated in place: "
        "pass a writable array"
    )


def leaf_error(path: str, a, be, role: str, shape=None, dtype=None) -> Exception | None:
    """The first problem with leaf ``a`` (named ``path``) for backend module ``be``, or None.

    ``role`` is ``"params"`` (must be writeable) or ``"grads"``; ``shape`` and ``dtype``, when
    given, are what the leaf must have. An ``ndarray`` subclass is checked as its base view
    (:func:`as_base_array`); a masked array is refused.

    Examples
    --------
    >>> numpy_backend = backends.get("numpy")
    >>> leaf_error("params['w']", np.zeros(3, np.int32), numpy_backend, "params")
    TypeError("params['w'] has dtype int32; adamnp updates float32, float64, float16 and bfloat16 arrays only")
    """  # noqa: E501
    if isinstance(a, np.ma.MaskedArray):
        return TypeError(
            f"{path} is a masked array (numpy.ma.MaskedArray), which adamnp refuses: it would "
            "ignore the mask, updating masked elements and letting NaN or Inf under a "
            "gradient's mask into params. Pass plain arrays (np.ma.getdata(a)) and handle the "
            "mask yourself, e.g. gradients a.filled(0)"
        )
    if role == "params" and isinstance(a, np.generic):
        return TypeError(
            f"{path} is a NumPy scalar ({type(a).__name__}), which is immutable: adamnp "
            "updates params in place, so a step would change a temporary copy. Use a 0-d "
            "array instead (np.array(x))"
        )
    original, a = a, as_base_array(a)
    if not be.owns(a):
        if isinstance(a, np.ndarray) or backends.is_device_array(a):
            where = "a CUDA device array" if backends.is_device_array(a) else "a host NumPy array"
            return TypeError(
                f"{path} is {where}, but this state uses the {be.NAME!r} backend; "
                "keep every leaf in one memory space and pick the matching backend "
                "(backend='cuda' for device arrays, 'numba' or 'numpy' for host arrays)"
            )
        return _not_an_array(path, a, host_view(a)[1])
    a_dtype, a_shape = dtype_shape(a)
    if not is_param_dtype(a_dtype):
        return TypeError(
            f"{path} has dtype {a_dtype}; adamnp updates float32, float64, float16 and "
            "bfloat16 arrays only"
        )
    if dtype is not None and a_dtype != dtype:
        half_grad = role == "grads" and half_format(dtype) >= 0
        if not (half_grad and a_dtype == _FLOAT32):
            expected = f"{np.dtype(dtype)} or float32" if half_grad else f"{np.dtype(dtype)}"
            return TypeError(f"{path} has dtype {a_dtype}, expected {expected}")
    if shape is not None and a_shape != tuple(shape):
        return ValueError(f"{path} has shape {a_shape}, expected {tuple(shape)}")
    if not be.is_contiguous(a):
        return ValueError(
            f"{path} is not C-contiguous; adamnp updates arrays in place and needs "
            "contiguous memory (use np.ascontiguousarray and keep that array as the leaf)"
        )
    if role == "params" and (not be.is_writeable(a) or _is_jax(original)):
        return _read_only(path, a, original)
    return None


# -- init


def validate_params(params, config, backend: str):
    """Check :func:`adamnp.init`'s ``config`` and ``params`` and pick the backend.

    Returns ``(leaves, treedef, paths, shapes, dtypes, name, be)``: the flattened tree, each
    leaf's shape and dtype, and the backend's name and module. Params that share memory are
    refused here, with the message :func:`adamnp.step` would give.

    Examples
    --------
    >>> import adamnp
    >>> validate_params({"w": np.zeros(2)}, adamnp.adam(), "numpy")[2:6]
    (["params['w']"], ((2,),), (dtype('float64'),), 'numpy')
    """
    if not isinstance(config, AdamConfig):
        raise TypeError(
            f"config must be an AdamConfig from adamnp.adam() or adamnp.adamw(), "
            f"got {type(config).__name__}"
        )
    leaves, treedef, paths = flatten(params)
    name = backends.resolve(backend, leaves)
    be = backends.get(name)
    for path, a in zip(paths, leaves):
        err = leaf_error(path, a, be, "params")
        if err is not None:
            raise err
    bases = list(map(as_base_array, leaves))
    if not _disjoint(bases, be):
        _check_aliasing(bases, [], paths, be)
    described = [dtype_shape(a) for a in bases]
    shapes = tuple(s for _, s in described)
    dtypes = tuple(d for d, _ in described)
    return leaves, treedef, paths, shapes, dtypes, name, be


def validate_layout(
    paths,
    leaves,
    *,
    state_bits: int,
    state_format: str,
    block_size: int,
    min_8bit_size: int,
    v_rounding: str | None,
    keep_fp32: Collection[str] | Callable[[str, object], bool] | None,
) -> Layout:
    """Check :func:`adamnp.init`'s layout options; return them as one :class:`Layout`.

    ``keep_fp32`` (one path, a collection of paths, or a predicate called with each path and
    leaf of ``leaves``) is resolved to the tuple of the paths it keeps at full precision, in
    tree order. ``state_bits``, ``block_size`` and ``min_8bit_size`` must be ints (NumPy
    integers are fine, ``bool`` and ``float`` are not): ``TypeError`` otherwise. The keywords
    are the fields of :class:`Layout`, so a saved layout checks the same way. ``v_rounding``
    None is the format's rounding: ``"stochastic"`` for ``"sqrt"`` (its only one),
    ``"nearest"`` for ``"bnb"``.

    Examples
    --------
    >>> validate_layout(["params"], None, state_bits=8, state_format="bnb", block_size=128,
    ...                 min_8bit_size=0, v_rounding=None, keep_fp32=["params"])
    Layout(state_bits=8, state_format='bnb', block_size=128, min_8bit_size=0, v_rounding='nearest', keep_fp32=('params',))
    """  # noqa: E501
    for name, value in (
        ("state_bits", state_bits),
        ("block_size", block_size),
        ("min_8bit_size", min_8bit_size),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if state_bits not in (32, 8):
        raise ValueError(f"state_bits must be 32 or 8, got {state_bits!r}")
    if not is_block_size(block_size):
        raise ValueError(f"block_size must be a power of two in 64..4096, got {block_size!r}")
    if min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be >= 0, got {min_8bit_size}")
    if not (isinstance(state_format, str) and state_format in STATE_FORMATS):
        raise ValueError(f"state_format must be one of {STATE_FORMATS}, got {state_format!r}")
    if v_rounding is None:
        v_rounding = "stochastic" if state_format == "sqrt" else "nearest"
    if v_rounding not in ("nearest", "stochastic"):
        raise ValueError(f"v_rounding must be 'nearest' or 'stochastic', got {v_rounding!r}")
    if state_format == "sqrt" and v_rounding != "stochastic":
        raise ValueError(
            "v_rounding='nearest' is only available with state_format='bnb'; the 'sqrt' format "
            "always rounds stochastically (nearest rounding would freeze a decaying v)"
        )
    if keep_fp32 is None:
        kept = ()
    elif callable(keep_fp32):
        kept = tuple(p for p, a in zip(paths, leaves) if keep_fp32(p, a))
    else:
        if isinstance(keep_fp32, str):  # one path, not a collection of one-letter paths
            keep_fp32 = (keep_fp32,)
        try:
            wanted = set(keep_fp32)
        except TypeError:
            wanted = None
        if wanted is None or not all(isinstance(p, str) for p in wanted):
            raise TypeError(
                "keep_fp32 must be a leaf path (str), a collection of leaf paths or a "
                f"predicate keep_fp32(path, array) -> bool, got {keep_fp32!r}"
            )
        unknown = sorted(wanted - set(paths))
        if unknown:
            raise ValueError(f"keep_fp32 names {unknown[0]!r}, which is not a leaf of params")
        kept = tuple(p for p in paths if p in wanted)
    return Layout(
        int(state_bits), state_format, int(block_size), int(min_8bit_size), str(v_rounding), kept
    )


def warn_layout(layout: Layout, paths, shapes, dtypes) -> None:
    """Warn (``UserWarning``, once per :func:`adamnp.init`) when ``state_bits=8`` stores no leaf
    in 8 bits: every leaf is too small (``min_8bit_size``), float64 or named by ``keep_fp32``.

    Examples
    --------
    >>> import warnings
    >>> layout = Layout(8, "sqrt", 256, 4096, "stochastic", ())
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_layout(layout, ["params"], [(10,)], [np.dtype(np.float32)])
    >>> print(caught[0].message)  # doctest: +ELLIPSIS
    state_bits=8, but no leaf got 8-bit moments: ...
    """
    if layout.state_bits != 8 or not paths or any(layout.eight_bit(paths, shapes, dtypes)):
        return
    warnings.warn(
        "state_bits=8, but no leaf got 8-bit moments: only float32 leaves with at least "
        f"min_8bit_size={layout.min_8bit_size} elements that keep_fp32 does not name are "
        "stored in 8 bits, so every leaf here keeps full-precision moments. Lower "
        "min_8bit_size to quantize smaller leaves, or pass state_bits=32",
        UserWarning,
        stacklevel=3,  # the caller of adamnp.init
    )


# -- step: the full checks, leaf by leaf


class _Arenas(NamedTuple):
    """Where a state's buffers lie: its few flat arenas, which no leaf may touch."""

    spans: list  # (first byte, end, "state", (group index, buffer name)) per non-empty buffer
    lo: np.ndarray  # shape=(len(spans),), int64; the first bytes, for the vectorized check
    hi: np.ndarray  # shape=(len(spans),), int64; the ends


def per_state(cache: weakref.WeakKeyDictionary, state: AdamState, make):
    """``make(state)``, computed once per state and kept in ``cache`` (keyed weakly by the
    state) until ``state.groups`` is replaced: what the step derives from a state's layout
    and buffers, which never move.

    Examples
    --------
    >>> import adamnp
    >>> cache, state = weakref.WeakKeyDictionary(), adamnp.init(np.zeros(3), adamnp.adam())
    >>> per_state(cache, state, lambda s: object()) is per_state(cache, state, len)
    True
    """
    cached = cache.get(state)
    if cached is not None and cached[0] is state.groups:
        return cached[1]
    value = make(state)
    cache[state] = (state.groups, value)
    return value


_ARENAS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # state -> (groups, _Arenas)


def _state_arenas(state: AdamState, be) -> _Arenas:
    """The state's :class:`_Arenas` (:func:`per_state`)."""
    return per_state(_ARENAS, state, lambda state: _arenas(state, be))


def _arenas(state: AdamState, be) -> _Arenas:
    spans = []
    for gi, group in enumerate(state.groups):
        for name, buf in group.buffers.items():
            lo, hi = be.address_range(buf)
            if hi > lo:
                spans.append((lo, hi, "state", (gi, name)))
    return _Arenas(
        spans,
        np.array([span[0] for span in spans], np.int64),
        np.array([span[1] for span in spans], np.int64),
    )


def _state_slot(state: AdamState, be, where, start: int) -> str:
    """``state.slots[i].<field>``: the slot holding byte ``start`` of arena ``where``."""
    gi, name = where
    group = state.groups[gi]
    buf = group.buffers[name]
    element = (start - be.address_range(buf)[0]) // np.dtype(buf.dtype).itemsize
    offsets = group.block_offsets if name.startswith("absmax") else group.offsets
    j = int(np.searchsorted(offsets, element, side="right")) - 1
    return f"state.slots[{int(group.leaf_ids[j])}].{name}"


def _overlap_error(here, prev, paths, state, be) -> ValueError:
    """The error for spans ``here`` and ``prev`` (``(lo, hi, role, id)``) that overlap."""
    leaf, other = (prev, here) if here[2] == "state" else (here, prev)
    name = paths[leaf[3]].replace("params", leaf[2], 1)
    if other[2] == "state":
        slot = _state_slot(state, be, other[3], max(leaf[0], other[0]))
        return ValueError(
            f"{name} shares memory with the optimizer state ({slot}); the state owns its "
            "buffers, so params and grads must be arrays of their own (copy the slot first)"
        )
    name_prev = paths[other[3]].replace("params", other[2], 1)
    return ValueError(
        f"{name} shares memory with {name_prev}; every param must own its "
        "memory (pass gradients in separate arrays)"
    )


def _check_aliasing(p_leaves, g_leaves, paths, be, state=None, state_spans=()) -> None:
    """Reject leaves that share memory with any other leaf or with the state's buffers.

    ``state_spans`` are the ``spans`` of :func:`_state_arenas` (one entry per arena, not
    per leaf).
    """
    spans = []
    for role, leaves in (("params", p_leaves), ("grads", g_leaves)):
        for i, a in enumerate(leaves):
            lo, hi = be.address_range(a)
            if hi > lo:
                spans.append((lo, hi, role, i))
    spans.extend(state_spans)
    spans.sort()
    last_any = None  # the span reaching furthest
    last_param = None
    for span in spans:
        lo, hi, role, _ = span
        for prev in (last_param, last_any) if role == "grads" else (last_any,):
            if prev is not None and lo < prev[1]:
                raise _overlap_error(span, prev, paths, state, be)
        if last_any is None or hi > last_any[1]:
            last_any = span
        if role == "params" and (last_param is None or hi > last_param[1]):
            last_param = span


def _validate_full(params, grads, state: AdamState, be, arenas: _Arenas):
    """Every check, leaf by leaf in tree order; raises the first problem found."""
    p_leaves, p_def, paths = flatten(params)
    g_leaves, g_def, _ = flatten(grads, "grads")
    if p_def != state.treedef:
        where = first_difference(p_def, state.treedef, "params", "the state's params")
        raise ValueError(f"params do not have the tree structure this state was built for: {where}")
    if g_def != p_def:
        where = first_difference(g_def, p_def, "grads", "params")
        raise ValueError(f"grads must have the same tree structure as params: {where}")
    for i, path in enumerate(paths):
        shape, dtype = state.shapes[i], state.dtypes[i]
        err = leaf_error(path, p_leaves[i], be, "params", shape, dtype)
        if err is None:
            gpath = path.replace("params", "grads", 1)
            err = leaf_error(gpath, g_leaves[i], be, "grads", shape, dtype)
        if err is not None:
            raise err
    p_leaves = list(map(as_base_array, p_leaves))
    g_leaves = list(map(as_base_array, g_leaves))
    _check_aliasing(p_leaves, g_leaves, paths, be, state, arenas.spans)
    return p_leaves, g_leaves, paths


# -- step: the fast path
#
# It accepts exactly what _validate_full accepts, minus some unusual but valid inputs (ndarray
# subclasses, which _validate_full turns into base views; dict keys of str/int subclasses;
# ...), which it hands to _validate_full; it never raises, so every error message comes from
# _validate_full. It exists for trees of many small leaves, where the full path costs ~10 us
# per leaf: no Python work per leaf here beyond C-level map() calls. The state's arenas join
# the aliasing check as a few spans, computed once per state (_state_arenas).

_CONTAINERS = (dict, list, tuple)
_KEY_TYPES = frozenset((str, int))
_HOST_PROBE = np.empty(0, np.float32)
_ABSENT = object()
_KEY, _SUBTREE = itemgetter(0), itemgetter(1)
_SHAPE, _DTYPE = attrgetter("shape"), attrgetter("dtype")
_C_CONTIGUOUS, _WRITEABLE = attrgetter("flags.c_contiguous"), attrgetter("flags.writeable")
_MIN_VECTOR_ALIASING = 64  # leaves; below this the plain loop of _check_aliasing is cheaper


def _leaves_like(tree, treedef, out: list) -> bool:
    """Append the leaves of ``tree`` to ``out`` if :func:`flatten` would give ``treedef``."""
    kind, children = treedef
    if kind == "dict":
        if not isinstance(tree, dict) or len(tree) != len(children):
            return False
        if not _KEY_TYPES.issuperset(map(type, tree)):
            return False
        # .get, not [], so that a defaultdict does not grow; a missing key gives _ABSENT
        nodes = list(map(tree.get, map(_KEY, children), repeat(_ABSENT)))
        subtrees = list(map(_SUBTREE, children))
    else:
        if not isinstance(tree, list if kind == "list" else tuple) or len(tree) != len(children):
            return False
        nodes, subtrees = tree, children
    if subtrees.count(None) == len(subtrees):  # only leaves below: check their types at once
        types = set(map(type, nodes))
        if object in types or any(issubclass(t, _CONTAINERS) for t in types):
            return False  # (an `object` is _ABSENT)
        out.extend(nodes)
        return True
    for node, subtree in zip(nodes, subtrees):
        if node is _ABSENT:
            return False
        if subtree is None:
            if isinstance(node, _CONTAINERS):
                return False
            out.append(node)
        elif not _leaves_like(node, subtree, out):
            return False
    return True


def leaves_like_state(params, grads, state: AdamState) -> tuple[list, list] | None:
    """``(p_leaves, g_leaves)`` if both trees have exactly the state's structure (the leaves
    in flattening order, unchecked), else None (the full validation says what differs)."""
    if state.treedef is None:
        if isinstance(params, _CONTAINERS) or isinstance(grads, _CONTAINERS):
            return None
        return [params], [grads]
    p_leaves, g_leaves = [], []
    if not (
        _leaves_like(params, state.treedef, p_leaves)
        and _leaves_like(grads, state.treedef, g_leaves)
    ):
        return None
    return p_leaves, g_leaves


def _host_leaves_ok(p_leaves, g_leaves, state: AdamState, be) -> bool:
    """True if every leaf is a plain host ndarray passing :func:`leaf_error`'s checks."""
    if not be.owns(_HOST_PROBE):
        return False
    shapes, dtypes = list(state.shapes), list(state.dtypes)
    return (
        {*map(type, p_leaves), *map(type, g_leaves)} == {np.ndarray}
        and list(map(_SHAPE, p_leaves)) == shapes
        and list(map(_SHAPE, g_leaves)) == shapes
        and list(map(_DTYPE, p_leaves)) == dtypes
        and (
            list(map(_DTYPE, g_leaves)) == dtypes
            or all(map(grad_dtype_ok, map(_DTYPE, g_leaves), dtypes))
        )
        and all(map(_C_CONTIGUOUS, p_leaves))
        and all(map(_WRITEABLE, p_leaves))
        and all(map(_C_CONTIGUOUS, g_leaves))
    )


def _disjoint(leaves, be, arenas: _Arenas | None = None) -> bool:
    """True if no two non-empty leaves share memory, nor a leaf with one of the state's
    ``arenas`` (vectorized; needs ``be.data_addresses``)."""
    addresses = getattr(be, "data_addresses", None)
    if addresses is None or len(leaves) < _MIN_VECTOR_ALIASING:
        return False
    lo = addresses(leaves)
    hi = lo + np.fromiter((a.nbytes for a in leaves), np.int64, len(leaves))
    if arenas is not None:
        lo, hi = np.concatenate((lo, arenas.lo)), np.concatenate((hi, arenas.hi))
    used = hi > lo
    lo, hi = lo[used], hi[used]
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order], hi[order]
    return not np.any(lo[1:] < np.maximum.accumulate(hi)[:-1])


_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # state -> (groups, spec)


#: Mean elements per leaf from which the leaves are checked in Python rather than by the
#: backend's compiled scan: there the Python checks (about 4 us more per leaf) cost under
#: 1% of the update, so compiling the scan (0.5 s on first use) does not pay.
SCAN_MAX_MEAN_LEAF = 1 << 19


def _leaf_spec(state: AdamState, be):
    """The backend's record of what the state's leaves must be (``be.leaf_spec``: shapes,
    dtypes, and float32 as the other gradient dtype of half-precision leaves;
    :func:`per_state`), or None where the leaves are large (:data:`SCAN_MAX_MEAN_LEAF`)."""

    def make(state):
        if not _scans(state):
            return None
        alt = [_FLOAT32 if half_format(d) >= 0 else d for d in state.dtypes]
        return be.leaf_spec(state.shapes, state.dtypes, alt)

    return per_state(_SPECS, state, make)


def _scans(state: AdamState) -> bool:
    """Whether the state's leaves are checked by the backend's compiled scan: their mean
    size is under :data:`SCAN_MAX_MEAN_LEAF`."""
    sizes = [math.prod(shape) for shape in state.shapes]
    return sum(sizes) < SCAN_MAX_MEAN_LEAF * max(len(sizes), 1)


def adopt_leaf_checks(twin: AdamState, state: AdamState) -> None:
    """Make ``twin`` (a smaller state of the same leaves: :mod:`adamnp._background`) check
    its leaves as ``state`` does, by the compiled scan or in Python (:func:`_scans` decides
    by size; a smaller twin would scan where ``state`` does not)."""
    if not _scans(state):
        _SPECS[twin] = (twin.groups, None)


def _validate_fast(params, grads, state: AdamState, be, arenas: _Arenas):
    """``(p_leaves, g_leaves, paths)`` if all is valid and cheap to check, else None.

    The paths are ``state.paths``: the tree has exactly the state's structure, so
    :func:`flatten` would name its leaves the same way.
    """
    leaves = leaves_like_state(params, grads, state)
    if leaves is None:
        return None
    p_leaves, g_leaves = leaves
    scan = getattr(be, "host_leaves_ok", None)
    spec = None if scan is None else _leaf_spec(state, be)
    if spec is not None:  # every check below in one compiled call
        verdict = scan(p_leaves, g_leaves, spec, arenas.lo, arenas.hi)
        if verdict is not None:
            return (p_leaves, g_leaves, state.paths) if verdict else None
    if not _host_leaves_ok(p_leaves, g_leaves, state, be):
        return None
    if not _disjoint(p_leaves + g_leaves, be, arenas):
        try:
            _check_aliasing(p_leaves, g_leaves, state.paths, be, state, arenas.spans)
        except ValueError:
            return None  # let _validate_full name the leaves
    return p_leaves, g_leaves, state.paths


# -- step


def validate_step(params, grads, state: AdamState, be=None):
    """Check ``params``, ``grads`` and ``state`` (everything but the gradients' values).

    Returns ``(p_leaves, g_leaves, paths, be)``: the leaves in flattening order (``ndarray``
    subclasses as base views of the same memory, :func:`as_base_array`), their paths and the
    backend module to step with: ``be`` if given (:mod:`adamnp._background`'s interim
    backend), else the state's. Raises the first problem found, naming its leaf; a tree mismatch
    names the first key or index where the trees differ, and a leaf that shares memory with
    another leaf or with the state's own buffers is refused.

    Examples
    --------
    >>> import adamnp
    >>> p = {"w": np.zeros(2, np.float32)}
    >>> state = adamnp.init(p, adamnp.adam(), backend="numpy")
    >>> validate_step(p, {"w": np.zeros(2, np.float32)}, state)[2]
    ("params['w']",)
    >>> validate_step(p, {"w": p["w"]}, state)
    Traceback (most recent call last):
      ...
    ValueError: params['w'] shares memory with grads['w']; every param must own its memory (pass gradients in separate arrays)
    """  # noqa: E501
    if not isinstance(state, AdamState):
        raise TypeError(f"state must be an AdamState from adamnp.init, got {type(state).__name__}")
    if be is None:
        be = backends.get(state.backend)
    arenas = _state_arenas(state, be)
    leaves = _validate_fast(params, grads, state, be, arenas)
    if leaves is None:
        leaves = _validate_full(params, grads, state, be, arenas)
    return (*leaves, be)


_SQUARE_BOUNDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # state -> bound


def _square_bound(state: AdamState) -> float:
    """:func:`~adamnp.backends.math.square_bound` of the state's leaves (``2**126`` with a
    float32 or half-precision leaf, else ``2**960``), once per state."""
    return per_state(_SQUARE_BOUNDS, state, lambda state: square_bound(state.dtypes))


def validate_gradients(g_leaves, paths, state: AdamState, be, sq_norm=None) -> bool:
    """The last check of a step, which reads the gradients: whether the step goes on.

    Unless ``nonfinite="propagate"``, looks for NaN, Inf or magnitudes at or above
    :func:`~adamnp.backends.math.grad_limit` in the gradients: under
    ``"raise"`` raises ``ValueError`` naming the first such gradient, under ``"skip"``
    returns False (the caller counts the skipped step). True otherwise.

    ``sq_norm``, the gradients' sum of squares where the step computed it (to clip), can
    answer without reading them again: below the state's
    :func:`~adamnp.backends.math.square_bound`, no element is NaN, Inf or at a limit. A
    NaN, infinite or larger sum is checked element by element.

    Examples
    --------
    >>> import adamnp
    >>> p, g = np.zeros(2, np.float32), np.array([1.0, np.inf], np.float32)
    >>> state = adamnp.init(p, adamnp.adam(nonfinite="skip"), backend="numpy")
    >>> validate_gradients([g], state.paths, state, backends.get("numpy"))
    False
    >>> validate_gradients([g], state.paths, state, backends.get("numpy"), sq_norm=float("inf"))
    False
    """
    if state.config.nonfinite == "propagate":
        return True
    if sq_norm is not None and sq_norm < _square_bound(state):
        return True
    return nonfinite_verdict(be.nonfinite_leaf(g_leaves), paths, state)


def nonfinite_verdict(bad: int, paths, state: AdamState) -> bool:
    """What the ``nonfinite`` policy makes of ``bad``, the index of the first leaf whose
    gradient is non-finite (-1: none): True (go on), False (``"skip"``), or the ``ValueError``
    of ``"raise"`` naming the gradient."""
    if bad < 0:
        return True
    if state.config.nonfinite == "skip":
        return False
    gpath = paths[bad].replace("params", "grads", 1)
    dtype = compute_dtype(state.dtypes[bad])
    raise ValueError(
        f"{gpath} contains NaN, Inf or a value of magnitude >= 2**{GRAD_LIMIT_EXP[dtype]} "
        f"(nonfinite='raise'; the square of a {dtype} gradient that large could overflow the "
        "second moment); nothing was updated. Use nonfinite='skip' to skip such steps or "
        "'propagate' to compute through them"
    )
