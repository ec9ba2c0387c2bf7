"""`init` and `step`: validate everything, then dispatch to a backend. No math here."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from itertools import repeat
from operator import attrgetter, itemgetter

import numpy as np

from . import backends
from ._config import AdamConfig
from ._state import AdamState, build_groups
from ._tree import flatten
from .backends.math import host_scalars

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _dtype_shape(a) -> tuple[np.dtype, tuple]:
    """dtype and shape of a leaf; device arrays report them through their CUDA interface
    (a PyTorch tensor's ``dtype`` is not a NumPy dtype)."""
    cai = None if isinstance(a, np.ndarray) else getattr(a, "__cuda_array_interface__", None)
    if cai is not None:
        return np.dtype(cai["typestr"]), tuple(int(d) for d in cai["shape"])
    return np.dtype(a.dtype), tuple(int(d) for d in a.shape)


def _leaf_error(path: str, a, be, role: str, shape=None, dtype=None) -> Exception | None:
    """The first problem with leaf ``a`` (named ``path``), or None."""
    if not be.owns(a):
        if isinstance(a, np.ndarray) or backends.is_device_array(a):
            where = "a CUDA device array" if backends.is_device_array(a) else "a host NumPy array"
            return TypeError(
                f"{path} is {where}, but this state uses the {be.NAME!r} backend; "
                "keep every leaf in one memory space and pick the matching backend "
                "(backend='cuda' for device arrays, 'numba' or 'numpy' for host arrays)"
            )
        return TypeError(f"{path} is a {type(a).__name__}, not an array")
    a_dtype, a_shape = _dtype_shape(a)
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


def init(
    params,
    config: AdamConfig,
    *,
    backend: str = "auto",
    state_bits: int = 32,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    keep_fp32: Collection[str] | Callable[[str, object], bool] | None = None,
    v_rounding: str = "nearest",
) -> AdamState:
    """Create zeroed optimizer state for ``params``.

    Parameters
    ----------
    params : array or tree of arrays
        One float32/float64 array, or dicts / lists / tuples of them (nested freely).
    config : AdamConfig
        From :func:`adamnp.adam` or :func:`adamnp.adamw`.
    backend : {"auto", "numpy", "numba", "cuda"}
        ``"auto"`` picks ``"cuda"`` for CUDA device arrays, else ``"numba"`` when Numba is
        installed, else the ``"numpy"`` reference.
    state_bits : {32, 8}
        32: full-precision moments (float32 for float32 leaves, float64 for float64 leaves).
        8: blockwise 8-bit moments for float32 leaves with at least ``min_8bit_size``
        elements (other leaves keep full-precision moments).
    block_size : int, default 256
        Elements per quantization block (power of two, 64..4096); 8-bit state only.
    min_8bit_size : int, default 4096
        Smaller leaves keep float32 moments (their state is negligible and 8-bit rounding
        of biases and norms costs accuracy).
    keep_fp32 : collection of str or callable, optional
        Leaves to keep at full precision with 8-bit state: paths such as ``"params['emb']"``,
        or a predicate ``keep_fp32(path, array) -> bool``.
    v_rounding : {"nearest", "stochastic"}, default "nearest"
        How 8-bit state stores the second moment ``v`` after each step. ``"nearest"``: the
        nearest map value, as bitsandbytes does. ``"stochastic"``: one of the two map values
        around it, the upper with probability proportional to the distance from the lower
        (unbiased; deterministic given the step and the element). With nearest rounding a
        decaying ``v`` sticks at its old code, which makes steps too small for many steps
        after a gradient shrinks; see docs/eight_bit.md for when this matters. ``m`` and
        amsgrad's max are always rounded to nearest.

    Returns
    -------
    AdamState

    Examples
    --------
    >>> import numpy as np, adamnp
    >>> params = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    >>> state = adamnp.init(params, adamnp.adamw(), backend="numpy")
    >>> state.step, state.paths
    (0, ("params['b']", "params['w']"))
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
        err = _leaf_error(path, a, be, "params")
        if err is not None:
            raise err
    if state_bits not in (32, 8):
        raise ValueError(f"state_bits must be 32 or 8, got {state_bits!r}")
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, (int, np.integer))
        or not 64 <= block_size <= 4096
        or block_size & (block_size - 1)
    ):
        raise ValueError(f"block_size must be a power of two in 64..4096, got {block_size!r}")
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, (int, np.integer)):
        raise TypeError(f"min_8bit_size must be an int, got {min_8bit_size!r}")
    if min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be >= 0, got {min_8bit_size}")
    if v_rounding not in ("nearest", "stochastic"):
        raise ValueError(f"v_rounding must be 'nearest' or 'stochastic', got {v_rounding!r}")
    if keep_fp32 is None:
        keep = [False] * len(leaves)
    elif callable(keep_fp32):
        keep = [bool(keep_fp32(p, a)) for p, a in zip(paths, leaves)]
    else:
        wanted = set(keep_fp32)
        unknown = sorted(wanted - set(paths))
        if unknown:
            raise ValueError(f"keep_fp32 names {unknown[0]!r}, which is not a leaf of params")
        keep = [p in wanted for p in paths]
    shapes = tuple(_dtype_shape(a)[1] for a in leaves)
    dtypes = tuple(_dtype_shape(a)[0] for a in leaves)
    use_q8 = [
        state_bits == 8 and d == np.float32 and math.prod(s) >= max(min_8bit_size, 1) and not k
        for s, d, k in zip(shapes, dtypes, keep)
    ]
    slots, groups = build_groups(
        shapes, dtypes, use_q8, config.amsgrad, int(block_size), be, v_rounding
    )
    return AdamState(
        config=config,
        backend=name,
        step=0,
        skipped_steps=0,
        treedef=treedef,
        paths=tuple(paths),
        shapes=shapes,
        dtypes=dtypes,
        slots=slots,
        groups=groups,
        state_bits=state_bits,
        block_size=int(block_size),
        v_rounding=v_rounding,
    )


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
        err = _leaf_error(path, p_leaves[i], be, "params", shape, dtype)
        if err is None:
            gpath = path.replace("params", "grads", 1)
            err = _leaf_error(gpath, g_leaves[i], be, "grads", shape, dtype)
        if err is not None:
            raise err
    _check_aliasing(p_leaves, g_leaves, paths, be)
    return p_leaves, g_leaves, paths


# The fast path below accepts exactly what _validate_full accepts, minus some unusual but
# valid inputs (ndarray subclasses, dict keys of str/int subclasses, ...), which it hands to
# _validate_full; it never raises, so every error message comes from _validate_full. It
# exists for trees of many small leaves, where the full path costs ~10 us per leaf.

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
    """True if every leaf is a plain host ndarray passing :func:`_leaf_error`'s checks."""
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


def _validate(params, grads, state: AdamState):
    """Check everything; return ``(p_leaves, g_leaves, paths, backend module)``."""
    if not isinstance(state, AdamState):
        raise TypeError(f"state must be an AdamState from adamnp.init, got {type(state).__name__}")
    be = backends.get(state.backend)
    leaves = _validate_fast(params, grads, state, be)
    if leaves is None:
        leaves = _validate_full(params, grads, state, be)
    return (*leaves, be)


def step(params, grads, state: AdamState) -> None:
    """Take one Adam/AdamW step: update ``params`` and ``state`` in place.

    Everything is validated first (tree structure, shapes, dtypes, memory layout, aliasing,
    the learning rate, and non-finite gradients under ``nonfinite="raise"``); if anything is
    wrong a ``ValueError`` or ``TypeError`` naming the leaf is raised and neither ``params``
    nor ``state`` has changed.

    Parameters
    ----------
    params : array or tree of arrays
        The tree given to :func:`init` (same structure, shapes and dtypes); updated in place.
    grads : array or tree of arrays
        Gradients with the same structure, shapes and dtypes as ``params``. Not modified.
    state : AdamState
        From :func:`init` or :func:`load_state`; updated in place.

    Notes
    -----
    With ``nonfinite="skip"`` a step whose gradients hold NaN or Inf changes nothing except
    ``state.skipped_steps``. With ``max_grad_norm`` set, the gradients are scaled by
    ``min(1, max_grad_norm / (norm + 1e-6))`` (torch's ``clip_grad_norm_``), with the norm
    accumulated in float64.

    Examples
    --------
    >>> import numpy as np, adamnp
    >>> p = np.array([1.0, -2.0], np.float32)
    >>> state = adamnp.init(p, adamnp.adam(lr=0.1), backend="numpy")
    >>> adamnp.step(p, np.array([0.5, -0.5], np.float32), state)
    >>> p.round(6), state.step
    (array([ 0.9, -1.9], dtype=float32), 1)
    """
    p_leaves, g_leaves, paths, be = _validate(params, grads, state)
    cfg = state.config
    lr = cfg.lr_at(state.step)
    nonfinite = -1
    if cfg.nonfinite != "propagate":
        nonfinite = be.nonfinite_leaf(g_leaves)
    grad_scale = 1.0
    if cfg.max_grad_norm is not None:
        norm = math.sqrt(be.grad_sq_norm(g_leaves))
        coef = cfg.max_grad_norm / (norm + 1e-6)
        grad_scale = 1.0 if coef >= 1.0 else coef  # NaN stays NaN, as in torch
    if nonfinite >= 0:
        if cfg.nonfinite == "skip":
            state.skipped_steps += 1
            return
        gpath = paths[nonfinite].replace("params", "grads", 1)
        raise ValueError(
            f"{gpath} contains NaN or Inf (nonfinite='raise'); nothing was updated. "
            "Use nonfinite='skip' to skip such steps or 'propagate' to compute through them"
        )
    scalars = host_scalars(cfg, state.step + 1, lr, grad_scale)
    for group in state.groups:
        be.step_group(group, p_leaves, g_leaves, scalars)
    state.step += 1
