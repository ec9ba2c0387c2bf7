"""Backends: modules with one contract, picked by name.

Each backend is a module (``numpy``, ``numba``, ``cuda``: the registry name is the module
name) providing every name of :class:`Backend`. The NumPy backend is the reference; the others
are verified against it. Shape, dtype and aliasing rules are checked once in
:mod:`adamnp._validate`, before any backend runs. :func:`resolve` is the one ``"auto"``
policy: CUDA for device arrays, else Numba when it runs, else the reference.

Layering: this package imports :mod:`adamnp.lowbit` and nothing else of adamnp (no public
module, no ``_api``, ``_checkpoint``, ``quant`` or command line); a test holds it.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

import numpy as np

NAMES = ("numpy", "numba", "cuda")


@runtime_checkable
class Backend(Protocol):
    """What every backend module provides (checked for each by ``tests/test_architecture.py``).

    Arrays here are the backend's own: host ``ndarray`` for ``numpy``/``numba``, CUDA device
    arrays for ``cuda``. ``group`` is an :class:`adamnp._state.LeafGroup`; ``params`` and
    ``grads`` are the validated flat lists of the whole tree's leaves.
    """

    NAME: str  # the registry name

    def availability(self) -> str | None:
        """None when usable here, else a sentence saying what to install."""

    def owns(self, array) -> bool:
        """Whether ``array`` lives in this backend's memory."""

    def is_contiguous(self, array) -> bool:
        """Whether ``array`` is C-contiguous."""

    def is_writeable(self, array) -> bool:
        """Whether ``array`` may be written in place."""

    def address_range(self, array) -> tuple[int, int]:
        """``(first byte, one past the last byte)`` of a contiguous array."""

    def zeros(self, n: int, dtype):
        """A zeroed flat array of ``n`` elements (state arenas)."""

    def full(self, n: int, value, dtype):
        """A flat array of ``n`` elements filled with ``value``."""

    def to_host(self, array):
        """A host NumPy copy of ``array`` (checkpoints)."""

    def from_host(self, array):
        """A copy of host array ``array`` in this backend's memory."""

    def copy_from_host(self, dst, src) -> None:
        """Copy host array ``src`` into backend array ``dst`` (same dtype and shape)."""

    def nonfinite_leaf(self, grads) -> int:
        """Index of the first gradient holding NaN, Inf or a magnitude at or above
        :func:`~adamnp.backends.math.grad_limit` of its dtype, or -1."""

    def grad_sq_norm(self, grads) -> float:
        """Sum of squares of all gradients (float64 accumulation, fixed order)."""

    def step_group(self, group, params, grads, scalars) -> None:
        """Update one leaf group in place; ``scalars`` is a
        :class:`~adamnp.backends.math.StepScalars`."""


#: Fast paths the core takes where a backend defines them (the Numba backend does):
#: ``data_addresses(arrays)`` (int64 data pointers, for the vectorized aliasing check);
#: ``leaf_spec(shapes, dtypes, alt_grad_dtypes)`` and ``host_leaves_ok(p_leaves, g_leaves,
#: spec, arena_lo, arena_hi) -> bool | None`` (every leaf check of a step in one call; None:
#: check in Python); ``checked_step_group(group, params, grads, scalars) -> int`` (the
#: non-finite check in the step's own call, for one-group states: -1 or the first bad leaf,
#: nothing written); ``step_one`` and ``step_one_half`` (the one-call step of a small
#: single-leaf state, of float32/float64 and of float16/bfloat16 params,
#: :mod:`adamnp._small`); ``kernels_on_disk(groups) -> bool`` (whether a first step would
#: load its compiled kernels rather than compile them, :mod:`adamnp._background`).
OPTIONAL = (
    "data_addresses",
    "leaf_spec",
    "host_leaves_ok",
    "checked_step_group",
    "step_one",
    "step_one_half",
    "kernels_on_disk",
)

#: Every name a backend module must define.
CONTRACT = ("NAME", *(n for n, f in vars(Backend).items() if callable(f) and n[0] != "_"))


def get(name: str):
    """Import and return the backend module registered as ``name``.

    Examples
    --------
    >>> get("numpy").NAME
    'numpy'
    """
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {NAMES} or 'auto'")
    return importlib.import_module(f"{__name__}.{name}")


def why_unavailable(name: str) -> str | None:
    """None when backend ``name`` can run here, else why not (never raises for a known name).

    Examples
    --------
    >>> why_unavailable("numpy") is None
    True
    """
    try:
        module = get(name)
    except ImportError as exc:
        return f"not included in this installation ({exc})"
    try:
        return module.availability()
    except Exception as exc:  # a broken driver must not break the caller
        return f"availability check failed: {type(exc).__name__}: {exc}"


def available(name: str) -> bool:
    """Whether backend ``name`` can run on this machine."""
    return why_unavailable(name) is None


def is_device_array(a) -> bool:
    """CUDA memory: ``__cuda_array_interface__`` (CuPy, PyTorch, Numba) or a Numba device
    array (including the CUDA simulator's, which have no such interface).

    Examples
    --------
    >>> import numpy as np
    >>> is_device_array(np.zeros(3))
    False
    """
    if isinstance(a, np.ndarray):
        return False
    return hasattr(a, "__cuda_array_interface__") or bool(getattr(a, "__cuda_ndarray__", False))


def resolve(name: str, leaves=()) -> str:
    """The backend to use for ``leaves``: ``name`` itself, checked, or the ``"auto"`` choice.

    ``"auto"`` picks ``"cuda"`` when any leaf is a CUDA device array, else ``"numba"`` when it
    runs here, else the ``"numpy"`` reference. Raises ``RuntimeError`` when the backend asked
    for (or needed by device arrays) cannot run here, ``ValueError`` for an unknown name.

    Examples
    --------
    >>> import numpy as np
    >>> resolve("auto", [np.zeros(3)]) in ("numba", "numpy")
    True
    """
    if name != "auto":
        why = get(name).availability()
        if why is not None:
            raise RuntimeError(f"backend {name!r} cannot run here: {why}")
        return name
    if any(is_device_array(a) for a in leaves):
        why = why_unavailable("cuda")
        if why is not None:
            raise RuntimeError(
                f"params hold CUDA device arrays, but the 'cuda' backend cannot run here: {why}"
            )
        return "cuda"
    return "numba" if available("numba") else "numpy"
