"""Compiling a Numba state's kernels in the background while its first steps run on NumPy.

Numba compiles a kernel the first time it is called with new argument types, and caches it on
disk: a new process's first step of a Numba state compiles for seconds, more with 8-bit state
(docs/backends.md, "First use"), and a later process loads from the cache in a fraction of
that. So the first step of a Numba state of at most :data:`WAIT_MAX` elements runs on
:mod:`adamnp.backends.numba.interim` (the NumPy reference, with the Numba backend's order of
the clipping norm: the same bits as the kernels) and then starts a thread that steps a
*twin* of the state with the Numba backend: the same groups, config and step count, and
zeroed params, gradients and buffers of the same types, but at most a few elements per leaf
(:func:`_twin_sizes`; it takes the same paths as the state: the small path or the groups,
the compiled leaf scan or not). That compiles, or loads, exactly the kernels the state's
steps run. A state of at most :data:`INTERIM_MAX` elements goes on in NumPy until the thread
has finished; a larger one, whose NumPy steps cost more, waits for it at its second step
(the compile overlaps whatever the caller does in between), unless its kernels are in
Numba's disk cache already: then its first step loads them, which is quicker than a NumPy
step. Then the compiled kernels run.
The results do not depend on when that happens.

The thread is not a daemon: a process that ends while it compiles waits for it (as it would
have waited for the compile in its first step), and a fork waits for it too (a compile lock
held by a thread that does not exist in the child would hang the child's first compile).

``ADAMNP_BACKGROUND_COMPILE=0`` (read at a state's first step) turns this off: the first step
compiles, as Numba always does. States over :data:`WAIT_MAX` elements compile in their
first step as well: their NumPy step would cost about as much as the compile.
"""

from __future__ import annotations

import copy
import math
import os
import threading
import weakref
from dataclasses import replace

import numpy as np

from . import backends
from ._small import SMALL_MAX
from ._state import AdamState
from ._tree import unflatten
from ._validate import adopt_leaf_checks

#: The largest state (elements) whose steps run on NumPy until the kernels are compiled: up
#: to here a NumPy step costs a small part of the compile (docs/backends.md, "First use").
INTERIM_MAX = 1 << 22
#: The largest state whose first step runs on NumPy (the next waits for the compile).
WAIT_MAX = 1 << 25
#: Elements per leaf of a twin of several leaves (a twin of one leaf: :func:`_twin_sizes`).
TWIN_LEAF = 64

ENV = "ADAMNP_BACKGROUND_COMPILE"

# id(state) -> (weak reference to the state, state.groups, the thread compiling its kernels
# or None: its own backend's steps, whether its second step waits for the thread); a plain
# dict by id: looked up on every step
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
    compiling), else None (the state's own backend). A state over :data:`INTERIM_MAX`
    elements whose thread is compiling waits for it here. Call with the state's lock held."""
    if type(state) is not AdamState or state.backend != "numba":
        return None
    entry = _COMPILES.get(id(state))
    if entry is None or entry[1] is not state.groups or entry[0]() is not state:
        # a new state, or a new layout
        elements = _elements(state)
        if not enabled() or elements > WAIT_MAX or (elements > INTERIM_MAX and _on_disk(state)):
            _record(state, None)
            return None
        entry = _record(state, _NOT_STARTED, elements > INTERIM_MAX)
    thread = entry[2]
    if thread is None:
        return None
    if thread is not _NOT_STARTED:
        if entry[3]:
            thread.join()
        if not thread.is_alive():
            _record(state, None)  # compiled: the kernels from now on
            return None
    from .backends.numba import interim

    return interim


def start(step, p_leaves, g_leaves, state: AdamState) -> None:
    """After a NumPy step of ``state`` that updated it: start the thread that compiles its
    kernels with ``step`` (:func:`adamnp.step`), unless it runs already. ``p_leaves`` and
    ``g_leaves`` are the step's validated leaves, whose dtypes and writability the twin's
    leaves copy."""
    entry = _entry(state)
    if entry is None or entry[2] is not _NOT_STARTED:
        return
    thread = None
    try:
        sizes = _twin_sizes(state)
        twin = _twin(state, sizes)
        params = unflatten(state.treedef, [np.zeros(n, a.dtype) for n, a in zip(sizes, p_leaves)])
        grads = unflatten(state.treedef, [_zeros(n, g) for n, g in zip(sizes, g_leaves)])
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
    _record(state, thread, entry[3])


def compiling(state: AdamState) -> bool:
    """Whether ``state``'s kernels are still being compiled for it (its steps run on NumPy,
    or its next step waits); does not wait.

    Examples
    --------
    >>> import adamnp
    >>> compiling(adamnp.init(np.zeros(3, np.float32), adamnp.adam(), backend="numpy"))
    False
    """
    thread = _thread(state)
    return thread is _NOT_STARTED or (thread is not None and thread.is_alive())


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
    thread = _thread(state)
    if thread is None or thread is _NOT_STARTED:
        return thread is None
    thread.join(timeout)
    return not thread.is_alive()


def _entry(state: AdamState):
    entry = _COMPILES.get(id(state))
    return entry if entry is not None and entry[0]() is state else None


def _thread(state: AdamState):
    """The state's compile thread, :data:`_NOT_STARTED`, or None (none to wait for)."""
    entry = _entry(state)
    return None if entry is None else entry[2]


def _record(state: AdamState, thread, wait: bool = False) -> tuple:
    key = id(state)
    ref = weakref.ref(state, lambda _, key=key: _COMPILES.pop(key, None))
    entry = _COMPILES[key] = (ref, state.groups, thread, wait)
    return entry


def _on_disk(state: AdamState) -> bool:
    """Whether the state's first step would rather load its kernels from Numba's disk cache
    (a fraction of a second) than compile them: then a NumPy first step of a large state
    costs more than it saves."""
    be = backends.get(state.backend)
    on_disk = getattr(be, "kernels_on_disk", None)
    return on_disk is not None and on_disk(state.groups)


def _elements(state: AdamState) -> int:
    return sum(math.prod(shape) for shape in state.shapes)


def _zeros(n: int, like: np.ndarray) -> np.ndarray:
    """``n`` zeros of ``like``'s dtype, read-only if ``like`` is (Numba types those apart)."""
    z = np.zeros(n, like.dtype)
    z.flags.writeable = like.flags.writeable
    return z


def _twin_sizes(state: AdamState) -> list[int]:
    """Elements of each leaf of ``state``'s twin: at most :data:`TWIN_LEAF`, and for a
    state of one leaf at most ``SMALL_MAX + 1``, so that the twin takes the small path
    exactly when the state does (empty leaves stay empty: they launch nothing)."""
    sizes = [math.prod(shape) for shape in state.shapes]
    cap = SMALL_MAX + 1 if len(sizes) == 1 else TWIN_LEAF
    return [min(n, cap) for n in sizes]


def _twin(state: AdamState, sizes: list[int]) -> AdamState:
    """A state like ``state`` (groups, config, step count) of flat leaves of ``sizes``
    elements, with zeroed buffers allocated as the backend allocates them; it checks its
    leaves as ``state`` does and runs its own backend's steps."""
    be = backends.get(state.backend)
    twin = copy.copy(state)  # with its own lock (AdamState.__setstate__)
    twin.shapes = tuple((n,) for n in sizes)
    twin.groups = tuple(_twin_group(g, sizes, be) for g in state.groups)
    adopt_leaf_checks(twin, state)
    _record(twin, None)
    return twin


def _twin_group(group, sizes: list[int], be):
    """``group`` for leaves of ``sizes`` elements: new offsets, zeroed buffers (per element
    or, for 8-bit groups, per block)."""
    n = np.array([sizes[i] for i in group.leaf_ids], np.int64)
    offsets = np.concatenate(([0], np.cumsum(n))).astype(np.int64)
    blocks = None
    if group.block_offsets is not None:
        per_leaf = -(-n // group.block_size)
        blocks = np.concatenate(([0], np.cumsum(per_leaf))).astype(np.int64)
    buffers = {}
    for name, buf in group.buffers.items():
        if buf.size == int(group.offsets[-1]):
            size = int(offsets[-1])
        elif blocks is not None and buf.size == int(group.block_offsets[-1]):
            size = int(blocks[-1])
        else:  # pragma: no cover - every buffer is per element or per block
            raise ValueError(f"buffer {name!r} is neither per element nor per block")
        buffers[name] = be.zeros(size, buf.dtype)
    return replace(group, offsets=offsets, block_offsets=blocks, buffers=buffers)


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
