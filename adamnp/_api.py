"""`init` and `step`: validate everything (:mod:`adamnp._validate`), then dispatch to a
backend. No math and no checks here."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from contextlib import nullcontext
from typing import NamedTuple

from . import _background
from ._config import AdamConfig, check_configs
from ._groups import resolve_labels
from ._small import try_step as try_small_step
from ._state import MIN_8BIT_SIZE, AdamState, Layout, amsgrad_of, build_groups
from ._validate import (
    nonfinite_verdict,
    validate_gradients,
    validate_layout,
    validate_params,
    validate_step,
    warn_layout,
)
from .backends.math import clip_scale, host_scalars


def init(
    params,
    config: AdamConfig | Mapping[str, AdamConfig],
    *,
    labels: Callable[[str, object], str] | object | None = None,
    backend: str = "auto",
    state_bits: int = 32,
    block_size: int = 256,
    min_8bit_size: int = MIN_8BIT_SIZE,
    keep_fp32: Collection[str] | Callable[[str, object], bool] | None = None,
    state_format: str = "sqrt",
    v_rounding: str | None = None,
) -> AdamState:
    """Create zeroed optimizer state for ``params``.

    Parameters
    ----------
    params : array or tree of arrays
        One float32/float64 array, or dicts / lists / tuples of them (nested freely).
    config : AdamConfig or mapping of str to AdamConfig
        From :func:`adamnp.adam` or :func:`adamnp.adamw`; or ``{label: config}`` with
        ``labels=``, to give leaves different hyperparameters (torch's param groups): each
        leaf is stepped with its label's config, all in one :func:`step`, with one step
        count. ``nonfinite`` and ``max_grad_norm`` apply to the whole step and must be equal
        in every config: ``max_grad_norm`` clips the global norm over all leaves, as
        ``torch.nn.utils.clip_grad_norm_`` over all parameters. Leaves of different labels
        are stepped by separate launches of the same kernels.
    labels : callable or tree of str, optional
        With a mapping ``config``: each leaf's label, as ``labels(path, leaf) -> str`` (e.g.
        ``lambda path, a: "no_decay" if a.ndim <= 1 else "decay"``) or a tree of labels with
        the structure of ``params``.
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
    keep_fp32 : str, collection of str or callable, optional
        Leaves to keep at full precision with 8-bit state: one path such as
        ``"params['emb']"``, a collection of paths, or a predicate
        ``keep_fp32(path, array) -> bool``.
    state_format : {"sqrt", "bnb"}, default "sqrt"
        What 8-bit codes store (docs/eight_bit.md). ``"sqrt"``: ``sqrt(v)`` on a map without
        zero (a wider one for blocks whose gradients span more than 13 binades) and ``m`` as
        its ratio to ``sqrt(v)``, both rounded stochastically; the largest step of a run
        stays within 1.5 times the float32 run's, whatever the gradients of a block
        (:mod:`adamnp.lowbit.sqrt`). ``"bnb"``: bitsandbytes' blockwise 8-bit layout and
        maps, byte for byte exchangeable with ``bnb.optim.AdamW8bit``; a gradient much
        smaller than the largest of its block (about 1e-3 and below) can round its ``v``
        toward zero and make its step hundreds of times ``lr``. Use it to exchange state
        with bitsandbytes.
    v_rounding : {"nearest", "stochastic"}, optional
        How ``state_format="bnb"`` stores the second moment ``v`` after each step (default
        ``"nearest"``, as bitsandbytes does). ``"stochastic"``: one of the two map values
        around it, the upper with probability proportional to the distance from the lower
        (unbiased; deterministic given the step and the element); with nearest rounding a
        decaying ``v`` sticks at its old code. ``m`` and amsgrad's max are always rounded to
        nearest there. The ``"sqrt"`` format always rounds stochastically (None or
        ``"stochastic"``).

    Returns
    -------
    AdamState

    Raises
    ------
    TypeError, ValueError
        A bad option (``state_bits``, ``block_size`` and ``min_8bit_size`` must be ints) or
        leaf, named; params that share memory with each other are refused here already.

    Warns
    -----
    UserWarning
        ``state_bits=8`` but no leaf gets 8-bit moments (all are float64, smaller than
        ``min_8bit_size`` or named by ``keep_fp32``).

    Notes
    -----
    Trees nest at most 100 levels deep (:data:`adamnp._tree.MAX_DEPTH`). A leaf that is an
    ``ndarray`` subclass (``np.memmap``, ``np.matrix``, ...) is treated as the plain array of
    its memory and updated in place; masked arrays are refused (the mask would be ignored).

    Examples
    --------
    >>> import numpy as np, adamnp
    >>> params = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    >>> state = adamnp.init(params, adamnp.adamw(), backend="numpy")
    >>> state.step, state.paths
    (0, ("params['b']", "params['w']"))

    No weight decay on vectors (biases, norm scales), and a global gradient clip:

    >>> configs = {"decay": adamnp.adamw(weight_decay=0.1, max_grad_norm=1.0),
    ...            "no_decay": adamnp.adamw(weight_decay=0.0, max_grad_norm=1.0)}
    >>> state = adamnp.init(params, configs, labels=lambda path, a: "no_decay" if a.ndim == 1
    ...                     else "decay", backend="numpy")
    >>> state.labels
    ('no_decay', 'decay')
    """
    got = check_init(params, config, labels, backend, state_bits=state_bits,
                     state_format=state_format, block_size=block_size,
                     min_8bit_size=min_8bit_size, v_rounding=v_rounding,
                     keep_fp32=keep_fp32)  # fmt: skip
    warn_layout(got.layout, got.paths, got.shapes, got.dtypes)
    amsgrad = amsgrad_of(got.config, got.configs)
    slots, groups = build_groups(got.paths, got.shapes, got.dtypes, got.layout, amsgrad, got.be,
                                 got.labels)  # fmt: skip
    return AdamState(
        config=got.config,
        backend=got.backend,
        step=0,
        skipped_steps=0,
        treedef=got.treedef,
        paths=tuple(got.paths),
        shapes=got.shapes,
        dtypes=got.dtypes,
        slots=slots,
        groups=groups,
        layout=got.layout,
        labels=got.labels,
        configs=got.configs,
    )


class InitInputs(NamedTuple):
    """What :func:`check_init` made of :func:`init`'s arguments."""

    leaves: list  # the flattened params
    treedef: object
    paths: list
    shapes: tuple
    dtypes: tuple
    backend: str  # the backend's name, "auto" resolved
    be: object  # the backend module
    layout: Layout
    configs: dict | None  # {label: AdamConfig}, or None for one config
    labels: tuple | None  # each leaf's label, or None
    config: AdamConfig  # the one config, or the first leaf's label's


def check_init(params, config, labels, backend: str, **layout_options) -> InitInputs:
    """Every check :func:`init` makes before it allocates (the params, the configs and
    labels, the layout options: ``TypeError`` / ``ValueError`` naming the culprit), and what
    they resolve to. :func:`adamnp.distributed.init` makes the same checks."""
    single = config if isinstance(config, AdamConfig) else None
    if single is None:
        single = next(iter(check_configs(config).values()))
    leaves, treedef, paths, shapes, dtypes, name, be = validate_params(params, single, backend)
    configs, leaf_labels = resolve_labels(config, labels, params, paths, leaves)
    layout = validate_layout(paths, leaves, **layout_options)
    if configs is not None and leaf_labels:
        single = configs[leaf_labels[0]]
    return InitInputs(leaves, treedef, paths, shapes, dtypes, name, be, layout, configs,
                      leaf_labels, single)  # fmt: skip


def step(params, grads, state: AdamState) -> None:
    """Take one Adam/AdamW step: update ``params`` and ``state`` in place.

    Everything is validated first (tree structure, shapes, dtypes, memory layout, aliasing
    between leaves and with the state's own buffers, the learning rate, and non-finite
    gradients under ``nonfinite="raise"``); if anything is wrong a ``ValueError`` or
    ``TypeError`` naming the leaf is raised and neither ``params`` nor ``state`` has changed.

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

    A step holds the state's lock from start to end: steps on one state from several threads
    run one at a time, in some order (each sees the previous one's ``state.step``).

    A ``"numba"`` state takes its first step in a process on the NumPy reference (the same
    bits) and then compiles its kernels (or loads them from Numba's disk cache) in a
    background thread; up to 4M elements its steps stay on NumPy until they are ready, up
    to 32M the second step waits for them. ``ADAMNP_BACKGROUND_COMPILE=0`` makes the first
    step compile instead (:mod:`adamnp._background`).

    Examples
    --------
    >>> import numpy as np, adamnp
    >>> p = np.array([1.0, -2.0], np.float32)
    >>> state = adamnp.init(p, adamnp.adam(lr=0.1), backend="numpy")
    >>> adamnp.step(p, np.array([0.5, -0.5], np.float32), state)
    >>> p.round(6), state.step
    (array([ 0.9, -1.9], dtype=float32), 1)
    """
    # the whole step under the state's lock (a non-state has none: validate_step refuses it)
    with state._lock if isinstance(state, AdamState) else nullcontext():
        # a Numba state's first steps run on NumPy while its kernels compile (_background)
        interim = _background.interim_backend(state)
        if (
            interim is None
            and isinstance(state, AdamState)
            and try_small_step(params, grads, state)
        ):
            return
        p_leaves, g_leaves, paths, be = validate_step(params, grads, state, interim)
        cfg = state.config  # nonfinite and max_grad_norm: every label's
        configs = {g.label: state.config_of(g) for g in state.groups}
        lrs = {label: c.lr_at(state.step) for label, c in configs.items()}  # schedules checked
        # one group and nothing computed from the gradients before the update: the backend
        # may check them in the step's own call (still before writing anything)
        fused = (
            len(state.groups) == 1
            and cfg.nonfinite != "propagate"
            and cfg.max_grad_norm is None
            and hasattr(be, "checked_step_group")
        )
        # the global norm, over all leaves; it also tells the check below whether the
        # gradients need reading again
        sq_norm = None if cfg.max_grad_norm is None else be.grad_sq_norm(g_leaves)
        if not fused and not validate_gradients(g_leaves, paths, state, be, sq_norm):
            state.skipped_steps += 1  # nonfinite="skip": NaN or Inf
            return
        grad_scale = 1.0
        if sq_norm is not None:
            grad_scale = clip_scale(sq_norm, cfg.max_grad_norm)
        scalars = {
            label: host_scalars(c, state.step + 1, lrs[label], grad_scale)
            for label, c in configs.items()
        }
        if fused:
            (group,) = state.groups
            bad = be.checked_step_group(group, p_leaves, g_leaves, scalars[group.label])
            if not nonfinite_verdict(bad, paths, state):
                state.skipped_steps += 1
                return
        else:
            for group in state.groups:
                be.step_group(group, p_leaves, g_leaves, scalars[group.label])
        state.step += 1
        if interim is not None:
            _background.start(step, p_leaves, g_leaves, state)
