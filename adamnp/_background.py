"""Compiling a Numba state's kernels in the background while its first steps run on NumPy.

Numba compiles a kernel the first time it is called with new argument types, and caches it on
disk: a new process's first step of a Numba state compiles for seconds, more with 8-bit state
(docs/backends.md, "First use"), and a later process loads from the cache in a fraction of
that. So the first step of a Numba state of at most :data:`INTERIM_MAX` elements runs on
:mod:`adamnp.backends.numba.interim` (the NumPy reference, with the Numba backend's order of
the clipping norm: the same bits as the kernels) and then starts a thread that steps a
*twin* of the state (the same layout, config and step count; zeroed buffers, params and
gradients of the same types) with the Numba backend: that compiles, or loads, exactly the
kernels the state's steps run. Steps go on in NumPy until the thread has finished, then run
the compiled kernels. The results do not depend on when that happens.

The thread is not a daemon: a process that ends while it compiles waits for it (as it would
have waited for the compile in its first step), and a fork waits for it too (a compile lock
held by a thread that does not exist in the child would hang the child's first compile).

``ADAMNP_BACKGROUND_COMPILE=0`` (read at a state's first step) turns this off: the first step
compiles, as Numba always does. Larger states compile in their first step as well: their
NumPy steps would cost more than the wait.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from dataclasses import replace

import numpy as np

from . import backends
from ._state import AdamState
from ._tree import unflatten

#: The largest state (elements) whose first steps run on NumPy while the kernels compile: up
#: to here a NumPy step costs a small part of the compile (docs/backends.md, "First use").
INTERIM_MAX = 1 << 22

ENV = "ADAMNP_BACKGROUND_COMPILE"

# id(state) -> (weak reference to the state, state.groups, the thread compiling its kernels
# or None: its own backend's steps); a plain dict by id: looked up on every step
_COMPILES: dict = {}
_NOT_STARTED = object()  # a state whose first NumPy step has not updated yet
_running: set = set()  # the compile threads alive, for the fork hook
_running_lock = threading.Lock()


def enabled() -> bool:
    """Whether a new Numba state's first steps may run on NumPy while its kernels compile
    (``ADAMNP_BACKGROUND_COMPILE`` is not ``0``).

    Examples
    --------
    >>> import os
    >>> enabled() == (os.environ.get("ADAMNP_BACKGROUND_COMPILE", "1").strip() != "0")
    True
    """
    return os.environ.get(ENV, "1").strip() != "0"


def interim_backend(state):
    """The backend to step ``state`` with now: :mod:`adamnp.backends.numba.interim` while
    the state's kernels are not compiled yet (:func:`start` has not run, or its thread is
    compiling), else None (the state's own backend). Call with the state's lock held."""
    if type(state) is not AdamState or state.backend != "numba":
        return None
    entry = _COMPILES.get(id(state))
    if entry is None or entry[1] is not state.groups or entry[0]() is not state:
        # a new state, or a new layout
        if not enabled() or _elements(state) > INTERIM_MAX:
            _record(state, None)
            return None
        entry = _record(state, _NOT_STARTED)
    thread = entry[2]
    if thread is None:
        return None
    if thread is not _NOT_STARTED and not thread.is_alive():
        _record(state, None)  # compiled: the kernels from now on
        return None
    from .backends.numba import interim

    return interim


def start(step, p_leaves, g_leaves, state: AdamState) -> None:
    """After a NumPy step of ``state`` that updated it: start the thread that compiles its
    kernels with ``step`` (:func:`adamnp.step`), unless it runs already. ``p_leaves`` and
    ``g_leaves`` are the step's validated leaves, whose types (dtype, shape, writability) the
    twin's leaves copy."""
    entry = _entry(state)
    if entry is None or entry[2] is not _NOT_STARTED:
        return
    thread = None
    try:
        twin = _twin(state)
        params = unflatten(state.treedef, [np.zeros(a.shape, a.dtype) for a in p_leaves])
        grads = unflatten(state.treedef, [_zeros_like(g) for g in g_leaves])
        thread = threading.Thread(
            target=_compile, args=(step, params, grads, twin), name="adamnp-compile", daemon=False
        )
        with _running_lock:
            _running.add(thread)
        thread.start()
    except Exception:  # no memory or no thread: the next step compiles in the foreground
        with _running_lock:
            _running.discard(thread)
        _record(state, None)
        return
    _record(state, thread)


def wait(state: AdamState, timeout: float | None = None) -> bool:
    """Wait until ``state``'s kernels are compiled (at most ``timeout`` seconds); True if
    they are, or if its steps do not run on NumPy meanwhile.

    Examples
    --------
    >>> import adamnp
    >>> state = adamnp.init(np.zeros(3, np.float32), adamnp.adam(), backend="numpy")
    >>> wait(state)
    True
    """
    entry = _entry(state)
    thread = None if entry is None else entry[2]
    if thread is None or thread is _NOT_STARTED:
        return thread is None
    thread.join(timeout)
    return not thread.is_alive()


def _entry(state: AdamState):
    entry = _COMPILES.get(id(state))
    return entry if entry is not None and entry[0]() is state else None


def _record(state: AdamState, thread) -> tuple:
    key = id(state)
    ref = weakref.ref(state, lambda _, key=key: _COMPILES.pop(key, None))
    entry = _COMPILES[key] = (ref, state.groups, thread)
    return entry


def _elements(state: AdamState) -> int:
    return sum(math.prod(shape) for shape in state.shapes)


def _zeros_like(a: np.ndarray) -> np.ndarray:
    """Zeros of ``a``'s shape and dtype, read-only if ``a`` is (Numba types those apart)."""
    z = np.zeros(a.shape, a.dtype)
    z.flags.writeable = a.flags.writeable
    return z


def _twin(state: AdamState) -> AdamState:
    """A state like ``state`` (layout, config, step count) with zeroed buffers of its own,
    allocated as the backend allocates them; marked to run its own backend's steps."""
    be = backends.get(state.backend)
    twin = state.__class__.__new__(state.__class__)
    twin.__setstate__(state.__getstate__())  # its own lock
    twin.groups = tuple(
        replace(g, buffers={k: be.zeros(b.size, b.dtype) for k, b in g.buffers.items()})
        for g in state.groups
    )
    _record(twin, None)
    return twin


def _compile(step, params, grads, twin: AdamState) -> None:
    """The thread: one step of the twin with the Numba backend compiles what a step of the
    state runs. A failure is left to the state's own first Numba step, which compiles (and
    raises) in the foreground."""
    try:
        step(params, grads, twin)
    except Exception:  # the state's first Numba step compiles again and raises it
        pass
    finally:
        with _running_lock:
            _running.discard(threading.current_thread())


def _wait_all() -> None:
    """Before a fork: let running compiles finish."""
    with _running_lock:
        threads = list(_running)
    for thread in threads:
        if thread is not threading.current_thread():
            thread.join()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_wait_all)
