"""The small-step path of :func:`adamnp.step`: one leaf, one compiled call.

For a state of one float32 or float64 leaf of at most :data:`SMALL_MAX` elements with
full-precision moments on a backend that has a one-call kernel (``step_one``: the Numba
backend), a step is: the cheap checks that can change between steps (the leaf's type,
shape, dtype, contiguity, writability), the step's scalars, and one call that checks
aliasing and non-finite gradients and then updates, writing nothing unless every check
passes. Anything else, and any step that a check refuses, goes the full way
(:func:`~adamnp._validate.validate_step` and the backend's group kernels), which names what
is wrong; so errors, and the all-or-nothing guarantee, are the same on both paths, and so
are the results (the same scalars and element math, bit for bit; tests/test_small_step.py).

What it saves is the fixed cost of a step (tens of microseconds): scipy-style loops over
small parameter vectors pay it every iteration (docs/backends.md has the numbers).
"""

from __future__ import annotations

import weakref

import numpy as np

from . import backends
from ._state import AdamState
from ._validate import leaves_like_state, per_state
from .backends.math import SMALL_NONFINITE, SMALL_UPDATED, host_scalars
from .lowbit.half import param_key

#: Largest leaf (elements) the small path takes; larger ones gain from threads.
SMALL_MAX = 1 << 16


class _Plan:
    """What a state's small steps reuse: the kernel, the leaf's shape and dtype, its
    moment buffers and the config's group; for a float16 or bfloat16 leaf also its format
    and the dtype its gradient may have besides (float32)."""

    __slots__ = ("alt_dtype", "dtype", "group", "groups", "half", "kernel", "m", "shape", "v",
                 "vmax")  # fmt: skip

    def __init__(self, state: AdamState, kernel):
        group = state.groups[0]
        self.groups, self.kernel, self.group = state.groups, kernel, group
        self.shape, self.dtype = state.shapes[0], state.dtypes[0]
        self.half = group.half
        self.alt_dtype = np.dtype(np.float32) if group.half >= 0 else self.dtype
        buffers = group.buffers
        self.m, self.v = buffers["m"], buffers["v"]
        self.vmax = buffers.get("vmax")  # None without amsgrad


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # state -> (groups, plan)


def _plan(state: AdamState) -> _Plan | None:
    """The state's small-step plan (:func:`~adamnp._validate.per_state`), or None if the
    path does not apply."""
    return per_state(_PLANS, state, _make_plan)


def _make_plan(state: AdamState) -> _Plan | None:
    groups = state.groups
    if not (len(state.slots) == 1 and len(groups) == 1 and groups[0].kind == "fp32"):
        return None
    kind = "step_one_half" if groups[0].half >= 0 else "step_one"
    kernel = getattr(backends.get(state.backend), kind, None)
    if kernel is not None and int(np.prod(state.shapes[0])) <= SMALL_MAX:
        return _Plan(state, kernel)
    return None


def try_step(params, grads, state: AdamState) -> bool:
    """Take the step on the small path if it applies and every check passes.

    True if the step was taken (or, under ``nonfinite="skip"``, counted as skipped); False
    if nothing was touched and the full path must run. Call with the state's lock held.
    """
    plan = _plan(state)
    if plan is None or state.config.max_grad_norm is not None:
        return False
    leaves = leaves_like_state(params, grads, state)
    if leaves is None:
        return False
    (p,), (g,) = leaves
    if type(p) is not np.ndarray or type(g) is not np.ndarray:
        return False
    if p.shape != plan.shape or g.shape != plan.shape:
        return False
    if p.dtype != plan.dtype or (g.dtype != plan.dtype and g.dtype != plan.alt_dtype):
        return False
    p_flags = p.flags
    if not (p_flags.c_contiguous and p_flags.writeable and g.flags.c_contiguous):
        return False
    if p.ndim != 1:  # one compiled kernel: flat views (C-contiguous, so no copies)
        p, g = p.reshape(-1), g.reshape(-1)
    config = state.config_of(plan.group)
    nonfinite = state.config.nonfinite
    s = host_scalars(config, state.step + 1, config.lr_at(state.step))
    args = (plan.m, plan.v, plan.vmax, s[:9], s.decoupled_decay, s.l2_decay, s.maximize,
            nonfinite != "propagate")  # fmt: skip
    if plan.half < 0:
        status = plan.kernel(p, g, *args)
    else:  # the bits of p (and of a half g), the format, rounding and parameter key
        group = plan.group
        bits = p.view(np.uint16)
        g = g.view(np.uint16) if g.dtype == plan.dtype else g
        key = np.uint32(param_key(s.step, group.tag))
        status = plan.kernel(bits, g, *args, plan.half, s.stochastic_params, key,
                             np.int64(group.index_base))  # fmt: skip
    if status == SMALL_UPDATED:
        state.step += 1
        return True
    if status == SMALL_NONFINITE and nonfinite == "skip":
        state.skipped_steps += 1
        return True
    return False
