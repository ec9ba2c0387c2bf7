"""Backends: modules with one contract, picked by name.

Each backend module defines the same names:

``NAME``
    Its registry name.
``availability() -> str | None``
    None when usable here, else a sentence saying what to install.
``owns(array) -> bool``
    Whether ``array`` lives in this backend's memory (host ndarray or CUDA device array).
``zeros(n, dtype)``, ``full(n, value, dtype)``, ``to_host(a)``, ``from_host(a)``
    Arena allocation and copies for checkpoints.
``nonfinite_leaf(grads) -> int``
    Index of the first gradient holding NaN or Inf, or -1.
``grad_sq_norm(grads) -> float``
    Sum of squares of all gradients (float64 accumulation).
``step_group(group, params, grads, scalars)``
    Update one :class:`~adamnp._state.LeafGroup` in place; ``params``/``grads`` are the
    flattened leaves of the whole tree, ``scalars`` a :class:`~adamnp.backends.math.StepScalars`.

The NumPy backend is the reference; the others are verified against it. Shape, dtype and
aliasing rules are checked once in :mod:`adamnp._api`, before any backend runs.
"""

from __future__ import annotations

import importlib

NAMES = ("numpy", "numba", "cuda")
_MODULES = {name: name for name in NAMES}


def get(name: str):
    """Import and return the backend module registered as ``name``."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {NAMES} or 'auto'")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")


def available(name: str) -> bool:
    """Whether backend ``name`` can run on this machine."""
    try:
        return get(name).availability() is None
    except ImportError:
        return False
