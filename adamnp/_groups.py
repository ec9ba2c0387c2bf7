"""Per-leaf hyperparameters: configs by label (like torch's param groups and optax's
``multi_transform``), and changing the hyperparameters of a running state.

A state built from one :class:`AdamConfig` has no labels. One built from a mapping ``{label:
config}`` gives each leaf a label (``labels=`` of :func:`adamnp.init`); its leaves are stepped
by their label's config, in the same single :func:`adamnp.step` call. The options that decide
a whole step, ``nonfinite`` and ``max_grad_norm``, must be the same in every config: the
gradient norm is clipped **globally** over all leaves, as ``torch.nn.utils.clip_grad_norm_``
over all parameters is, and a non-finite gradient anywhere skips or refuses the whole step.
"""

from __future__ import annotations

from collections.abc import Callable

from ._config import OPTION_NAMES, STEP_OPTIONS, AdamConfig, adam, adamw, check_configs
from ._state import AdamState
from ._tree import first_difference, flatten


def resolve_labels(config, labels, params, paths, leaves):
    """``(configs, leaf_labels)`` of :func:`adamnp.init`'s ``config`` and ``labels``.

    ``(None, None)`` for a single :class:`AdamConfig`; else the mapping as a plain dict and
    one label per leaf, in flattening order. Raises ``TypeError``/``ValueError`` naming the
    label, leaf or option at fault.
    """
    if isinstance(config, AdamConfig):
        if labels is not None:
            raise ValueError(
                "labels= is given with a single config: pass a mapping {label: config} "
                "(e.g. {'decay': adamw(...), 'no_decay': adamw(weight_decay=0.0)})"
            )
        return None, None
    configs = check_configs(config)
    if labels is None:
        raise TypeError(
            "config is a mapping of labels to configs: labels= must say each leaf's label "
            "(a callable (path, leaf) -> label, or a tree of labels shaped like params)"
        )
    if callable(labels):
        leaf_labels = [_called(labels, path, leaf) for path, leaf in zip(paths, leaves)]
    else:
        leaf_labels, treedef, _ = flatten(labels, "labels")
        diff = first_difference(treedef, flatten(params)[1], "labels", "params")
        if diff is not None:
            raise ValueError(f"labels must have the structure of params: {diff}")
    for path, label in zip(paths, leaf_labels):
        if not isinstance(label, str) or label not in configs:
            known = ", ".join(repr(k) for k in configs)
            raise ValueError(f"{path} has label {label!r}, which is not one of {known}")
    return configs, tuple(leaf_labels)


def _called(labels: Callable, path: str, leaf):
    label = labels(path, leaf)
    if not isinstance(label, str):
        raise TypeError(f"labels({path!r}, leaf) returned {type(label).__name__}, not a str")
    return label


def configure(state, label: str | None = None, **changes) -> None:
    """Change hyperparameters of a running state, validated as :func:`adamnp.adamw` does.

    Parameters
    ----------
    state : AdamState
        Changed in place, under its lock (not while a step runs). Checkpoints record the new
        values.
    label : str, optional
        The label whose config changes, for a state built from a mapping of configs; None:
        every label (required for ``nonfinite`` and ``max_grad_norm``, which apply to the
        whole step). A state with a single config takes no label.
    **changes
        Options of :func:`adamnp.adam` / :func:`adamnp.adamw` (``lr``, a schedule included,
        ``betas``, ``eps``, ``weight_decay``, ``maximize``, ``nonfinite``,
        ``max_grad_norm``). ``amsgrad`` cannot change: it decides which buffers the state
        has.

    Raises
    ------
    TypeError, ValueError
        An unknown option or label, an invalid value, or a change of ``amsgrad``; the state
        is then unchanged.

    Examples
    --------
    >>> import numpy as np, adamnp
    >>> p = np.zeros(3, np.float32)
    >>> state = adamnp.init(p, adamnp.adamw(lr=1e-3), backend="numpy")
    >>> adamnp.configure(state, lr=1e-4, weight_decay=0.0)
    >>> state.config.lr, state.config.weight_decay
    (0.0001, 0.0)
    >>> adamnp.configure(state, lr=-1.0)
    Traceback (most recent call last):
      ...
    ValueError: lr must be >= 0, got -1.0
    """
    if not isinstance(state, AdamState):
        raise TypeError(f"state must be an AdamState, got {type(state).__name__}")
    with state._lock:
        configs = dict(state.configs) if state.configs is not None else {None: state.config}
        if state.configs is None and label is not None:
            raise ValueError(f"label={label!r}: this state has a single config, no labels")
        if label is not None and label not in configs:
            known = ", ".join(repr(k) for k in configs)
            raise ValueError(f"label {label!r} is not one of {known}")
        if "amsgrad" in changes:
            raise ValueError(
                "amsgrad cannot change on a running state (it decides the state's buffers); "
                "build a new state with adamnp.init"
            )
        step_wide = sorted(set(changes) & set(STEP_OPTIONS))
        if label is not None and step_wide and len(configs) > 1:
            raise ValueError(
                f"{step_wide[0]} applies to the whole step: change it for every label (label=None)"
            )
        targets = list(configs) if label is None else [label]
        new = {k: _replaced(configs[k], changes) if k in targets else configs[k] for k in configs}
        if state.configs is None:
            state.config = new[None]
            return
        new = check_configs(new)
        state.configs = new
        state.config = new[state.labels[0]] if state.labels else next(iter(new.values()))


def _replaced(cfg: AdamConfig, changes: dict) -> AdamConfig:
    """``cfg`` with ``changes``, through :func:`adam`/:func:`adamw`'s validation."""
    args = {name: getattr(cfg, name) for name in OPTION_NAMES}
    args.update(changes)
    return (adamw if cfg.decoupled else adam)(**args)
