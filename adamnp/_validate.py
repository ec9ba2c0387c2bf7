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

from collections.abc import Callable, Collection
from itertools import repeat
from operator import attrgetter, itemgetter

import numpy as np

from . import backends
from ._config import AdamConfig
from ._state import AdamState, Layout
from ._tree import flatten
from .lowbit.reference import is_block_size

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


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
        return np.dtype(cai["typestr"]), tuple(int(d) for d in cai["shape"])
    return np.dtype(a.dtype), tuple(int(d) for d in a.shape)


def leaf_error(path: str, a, be, role: str, shape=None, dtype=None) -> Exception | None:
    """The first problem with leaf ``a`` (named ``path``) for backend module ``be``, or None.

    ``role`` is ``"params"`` (must be writeable) or ``"grads"``; ``shape`` and ``dtype``, when
    given, are what the leaf must have.

    Examples
    --------
    >>> numpy_backend = backends.get("numpy")
    >>> leaf_error("params['w']", np.zeros(3, np.int32), numpy_backend, "params")
    TypeError("params['w'] has dtype int32; adamnp updates float32 and float64 arrays only")
    """
    if not be.owns(a):
        if isinstance(a, np.ndarray) or backends.is_device_array(a):
            where = "a CUDA device array" if backends.is_device_array(a) else "a host NumPy array"
            return TypeError(
                f"{path} is {where}, but this state uses the {be.NAME!r} backend; "
                "keep every leaf in one memory space and pick the matching backend "
                "(backend='cuda' for device arrays, 'numba' or 'numpy' for host arrays)"
            )
        return TypeError(f"{path} is a {type(a).__name__}, not an array")
    a_dtype, a_shape = dtype_shape(a)
    if a_dtype not in FLOAT_DTYPES:
        return TypeError(
            f"{path} has dtype {a_dtype}; adamnp updates float32 and float64 arrays only"
        )
    if dtype is not None and a_dtype != dtype:
        return TypeError(f"{path} has dtype {a_dtype}, expected {np.dtype(dtype)}")
    if shape is not None and a_shape != tuple(shape):
        return ValueError(f"{path} has shape {a_shape}, expected {tuple(shape)}")
    if not be.is_contiguous(a):
        return ValueError(
            f"{path} is not C-contiguous; adamnp updates arrays in place and needs "
            "contiguous memory (use np.ascontiguousarray and keep that array as the leaf)"
        )
    if role == "params" and not be.is_writeable(a):
        return ValueError(f"{path} is read-only; params are updated in place")
    return None


# -- init


def validate_params(params, config, backend: str):
    """Check :func:`adamnp.init`'s ``config`` and ``params`` and pick the backend.

    Returns ``(leaves, treedef, paths, shapes, dtypes, name, be)``: the flattened tree, each
    leaf's shape and dtype, and the backend's name and module.

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
    described = [dtype_shape(a) for a in leaves]
    shapes = tuple(s for _, s in described)
    dtypes = tuple(d for d, _ in described)
    return leaves, treedef, paths, shapes, dtypes, name, be


def validate_layout(
    paths,
    leaves,
    *,
    state_bits: int,
    block_size: int,
    min_8bit_size: int,
    v_rounding: str,
    keep_fp32: Collection[str] | Callable[[str, object], bool] | None,
) -> Layout:
    """Check :func:`adamnp.init`'s layout options; return them as one :class:`Layout`.

    ``keep_fp32`` (paths, or a predicate called with each path and leaf of ``leaves``) is
    resolved to the tuple of the paths it keeps at full precision, in tree order. The keywords
    are the fields of :class:`Layout`, so a saved layout checks the same way.

    Examples
    --------
    >>> validate_layout(["params"], None, state_bits=8, block_size=128, min_8bit_size=0,
    ...                 v_rounding="nearest", keep_fp32=["params"])
    Layout(state_bits=8, block_size=128, min_8bit_size=0, v_rounding='nearest', keep_fp32=('params',))
    """  # noqa: E501
    if state_bits not in (32, 8):
        raise ValueError(f"state_bits must be 32 or 8, got {state_bits!r}")
    if not is_block_size(block_size):
        raise ValueError(f"block_size must be a power of two in 64..4096, got {block_size!r}")
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, (int, np.integer)):
        raise TypeError(f"min_8bit_size must be an int, got {min_8bit_size!r}")
    if min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be >= 0, got {min_8bit_size}")
    if v_rounding not in ("nearest", "stochastic"):
        raise ValueError(f"v_rounding must be 'nearest' or 'stochastic', got {v_rounding!r}")
    if keep_fp32 is None:
        kept = ()
    elif callable(keep_fp32):
        kept = tuple(p for p, a in zip(paths, leaves) if keep_fp32(p, a))
    else:
        wanted = set(keep_fp32)
        unknown = sorted(wanted - set(paths))
        if unknown:
            raise ValueError(f"keep_fp32 names {unknown[0]!r}, which is not a leaf of params")
        kept = tuple(p for p in paths if p in wanted)
    return Layout(int(state_bits), int(block_size), int(min_8bit_size), str(v_rounding), kept)


# -- step: the full checks, leaf by leaf


def _check_aliasing(p_leaves, g_leaves, paths, be) -> None:
    """Reject params that share memory with any other param or gradient leaf."""
    spans = []
    for role, leaves in (("params", p_leaves), ("grads", g_leaves)):
        for i, a in enumerate(leaves):
            lo, hi = be.address_range(a)
            if hi > lo:
                spans.append((lo, hi, role, i))
    spans.sort()
    last_any = None  # (end, role, i) of the span reaching furthest
    last_param = None
    for lo, hi, role, i in spans:
        for prev in (last_param, last_any) if role == "grads" else (last_any,):
            if prev is not None and lo < prev[0]:
                name_prev = paths[prev[2]].replace("params", prev[1], 1)
                name_here = paths[i].replace("params", role, 1)
                raise ValueError(
                    f"{name_here} shares memory with {name_prev}; every param must own its "
                    "memory (pass gradients in separate arrays)"
                )
        if last_any is None or hi > last_any[0]:
            last_any = (hi, role, i)
        if role == "params" and (last_param is None or hi > last_param[0]):
            last_param = (hi, role, i)


def _validate_full(params, grads, state: AdamState, be):
    """Every check, leaf by leaf in tree order; raises the first problem found."""
    p_leaves, p_def, paths = flatten(params)
    g_leaves, g_def, _ = flatten(grads, "grads")
    if p_def != state.treedef:
        raise ValueError(
            "params do not have the tree structure this state was built for "
            f"(state has {len(state.paths)} leaves: {', '.join(state.paths[:4])}"
            f"{', ...' if len(state.paths) > 4 else ''}; params have {len(paths)})"
        )
    if g_def != p_def:
        raise ValueError(
            "grads must have the same tree structure as params "
            f"({len(g_leaves)} grad leaves vs {len(p_leaves)} params)"
        )
    for i, path in enumerate(paths):
        shape, dtype = state.shapes[i], state.dtypes[i]
        err = leaf_error(path, p_leaves[i], be, "params", shape, dtype)
        if err is None:
            gpath = path.replace("params", "grads", 1)
            err = leaf_error(gpath, g_leaves[i], be, "grads", shape, dtype)
        if err is not None:
            raise err
    _check_aliasing(p_leaves, g_leaves, paths, be)
    return p_leaves, g_leaves, paths


# -- step: the fast path
#
# It accepts exactly what _validate_full accepts, minus some unusual but valid inputs (ndarray
# subclasses, dict keys of str/int subclasses, ...), which it hands to _validate_full; it never
# raises, so every error message comes from _validate_full. It exists for trees of many small
# leaves, where the full path costs ~10 us per leaf: no Python work per leaf here beyond
# C-level map() calls.

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
        and list(map(_DTYPE, g_leaves)) == dtypes
        and all(map(_C_CONTIGUOUS, p_leaves))
        and all(map(_WRITEABLE, p_leaves))
        and all(map(_C_CONTIGUOUS, g_leaves))
    )


def _disjoint(leaves, be) -> bool:
    """True if no two non-empty leaves share memory (vectorized; needs ``be.data_addresses``)."""
    addresses = getattr(be, "data_addresses", None)
    if addresses is None or len(leaves) < _MIN_VECTOR_ALIASING:
        return False
    lo = addresses(leaves)
    hi = lo + np.fromiter((a.nbytes for a in leaves), np.int64, len(leaves))
    used = hi > lo
    lo, hi = lo[used], hi[used]
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order], hi[order]
    return not np.any(lo[1:] < np.maximum.accumulate(hi)[:-1])


def _validate_fast(params, grads, state: AdamState, be):
    """``(p_leaves, g_leaves, paths)`` if all is valid and cheap to check, else None.

    The paths are ``state.paths``: the tree has exactly the state's structure, so
    :func:`flatten` would name its leaves the same way.
    """
    if state.treedef is None:
        if isinstance(params, _CONTAINERS) or isinstance(grads, _CONTAINERS):
            return None
        p_leaves, g_leaves = [params], [grads]
    else:
        p_leaves, g_leaves = [], []
        if not (
            _leaves_like(params, state.treedef, p_leaves)
            and _leaves_like(grads, state.treedef, g_leaves)
        ):
            return None
    if not _host_leaves_ok(p_leaves, g_leaves, state, be):
        return None
    if not _disjoint(p_leaves + g_leaves, be):
        try:
            _check_aliasing(p_leaves, g_leaves, state.paths, be)
        except ValueError:
            return None  # let _validate_full name the leaves
    return p_leaves, g_leaves, state.paths


# -- step


def validate_step(params, grads, state: AdamState):
    """Check ``params``, ``grads`` and ``state`` (everything but the gradients' values).

    Returns ``(p_leaves, g_leaves, paths, be)``: the leaves in flattening order, their paths
    and the state's backend module. Raises the first problem found, naming its leaf.

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
    be = backends.get(state.backend)
    leaves = _validate_fast(params, grads, state, be)
    if leaves is None:
        leaves = _validate_full(params, grads, state, be)
    return (*leaves, be)


def validate_gradients(g_leaves, paths, state: AdamState, be) -> bool:
    """The last check of a step, which reads the gradients: whether the step goes on.

    Unless ``nonfinite="propagate"``, looks for NaN or Inf in the gradients: under
    ``"raise"`` raises ``ValueError`` naming the first such gradient, under ``"skip"``
    returns False (the caller counts the skipped step). True otherwise.

    Examples
    --------
    >>> import adamnp
    >>> p, g = np.zeros(2, np.float32), np.array([1.0, np.inf], np.float32)
    >>> state = adamnp.init(p, adamnp.adam(nonfinite="skip"), backend="numpy")
    >>> validate_gradients([g], state.paths, state, backends.get("numpy"))
    False
    """
    policy = state.config.nonfinite
    if policy == "propagate":
        return True
    bad = be.nonfinite_leaf(g_leaves)
    if bad < 0:
        return True
    if policy == "skip":
        return False
    gpath = paths[bad].replace("params", "grads", 1)
    raise ValueError(
        f"{gpath} contains NaN or Inf (nonfinite='raise'); nothing was updated. "
        "Use nonfinite='skip' to skip such steps or 'propagate' to compute through them"
    )
