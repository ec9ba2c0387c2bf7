"""The per-element Adam/AdamW math and its scalars, written once, compiled everywhere.

:func:`adam_elem` is plain scalar Python: the Numba CPU backend compiles it with
``numba.njit(inline="always")`` and the CUDA backend with ``cuda.jit(device=True)``. It performs
exactly the operations of :func:`adamnp.backends.numpy.update_chunk`, in the same order, on
values of the leaf dtype.

Its scalars travel as one record: :func:`host_scalars` computes a step's values once on the
host in float64 (:class:`StepScalars`), :func:`kernel_scalars` rounds them once to the leaf
dtype (:class:`KernelScalars`), so every backend multiplies with the same numbers, and
:func:`kernel_flags` gives the four branch flags in the one order every kernel takes them.
Adding a scalar hyperparameter means a field here and its use in :func:`adam_elem` and the
reference's ``update_chunk``; the kernels pass the record through unchanged.

:func:`grad_limit` is the gradient magnitude, per leaf dtype, from which every backend's
non-finite check rejects a gradient (its square could overflow ``v``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class StepScalars(NamedTuple):
    """Host-side values for step ``t`` (float64 math, Python floats and bools)."""

    grad_scale: float  # gradient multiplier from global-norm clipping (1.0 when off)
    decay: float  # AdamW: 1 - lr * weight_decay
    weight_decay: float  # Adam: coefficient of the L2 term g += wd * p
    lerp_weight: float  # 1 - beta1: m moves towards g by this fraction
    beta2: float
    one_minus_beta2: float
    neg_step_size: float  # -lr / (1 - beta1**t)
    bc2_sqrt: float  # sqrt(1 - beta2**t)
    eps: float
    decoupled_decay: bool  # apply p *= decay (AdamW with weight_decay != 0)
    l2_decay: bool  # apply g += wd * p (Adam with weight_decay != 0)
    amsgrad: bool
    maximize: bool
    step: int = 0  # t, the 1-based step number (keys the stochastic rounding of 8-bit v)
    stochastic_params: bool = False  # round float16/bfloat16 params stochastically


def host_scalars(config, t: int, lr: float, grad_scale: float = 1.0) -> StepScalars:
    """Scalars of step ``t`` (1-based) at learning rate ``lr``, in float64 as torch does."""
    b1, b2 = config.betas
    wd = config.weight_decay
    decoupled = config.decoupled
    return StepScalars(  # positional: a per-step cost on small problems
        float(grad_scale),  # grad_scale
        1.0 - lr * wd,  # decay
        wd,  # weight_decay
        1.0 - b1,  # lerp_weight
        b2,  # beta2
        1.0 - b2,  # one_minus_beta2
        -(lr / (1.0 - b1**t)),  # neg_step_size
        math.sqrt(1.0 - b2**t),  # bc2_sqrt
        config.eps,  # eps
        decoupled and wd != 0.0,  # decoupled_decay
        (not decoupled) and wd != 0.0,  # l2_decay
        config.amsgrad,  # amsgrad
        config.maximize,  # maximize
        int(t),  # step
        config.param_rounding == "stochastic",  # stochastic_params
    )


def clip_scale(grad_sq_norm: float, max_grad_norm: float) -> float:
    """The gradient multiplier of global-norm clipping, as torch's ``clip_grad_norm_``.

    ``min(1, max_grad_norm / (norm + 1e-6))`` with ``norm = sqrt(grad_sq_norm)`` (float64);
    a NaN norm gives NaN.

    Examples
    --------
    >>> clip_scale(16.0, 1.0) == 1.0 / (4.0 + 1e-6), clip_scale(0.25, 1.0)
    (True, 1.0)
    """
    coef = max_grad_norm / (math.sqrt(grad_sq_norm) + 1e-6)
    return 1.0 if coef >= 1.0 else coef  # NaN stays NaN, as in torch


#: log2 of :func:`grad_limit` per compute dtype (:func:`compute_dtype`).
GRAD_LIMIT_EXP = {np.dtype(np.float32): 63, np.dtype(np.float64): 480}


def compute_dtype(dtype) -> np.dtype:
    """The dtype a leaf's arithmetic and full-precision moments use: float64 for float64
    leaves, float32 for float32, float16 and bfloat16 ones (the half-precision formats are
    upcast exactly, updated in float32 and rounded back, :mod:`adamnp.lowbit.half`).

    Examples
    --------
    >>> compute_dtype(np.float16), compute_dtype(np.float64)
    (dtype('float32'), dtype('float64'))
    """
    dtype = np.dtype(dtype)
    return dtype if dtype == np.float64 else np.dtype(np.float32)


def grad_limit(dtype) -> float:
    """T: the gradient magnitude from which the non-finite check rejects a gradient.

    Under ``nonfinite="raise"`` and ``"skip"`` a gradient element ``g`` counts as non-finite
    when it is NaN, Inf or ``|g| >= T``: ``2**63`` for float32 leaves, ``2**480`` for float64
    ones. Below it, ``v = v * b2 + ((1 - b2) * g) * g`` cannot overflow: ``T**2`` is at most a
    quarter of the dtype's overflow threshold, and ``v`` stays at most ``2 * T**2``
    (``2**127`` for float32) for every ``beta2`` in ``[0, 1)``, with clipping and
    ``maximize``; ``|m|`` stays at most ``2 * T``. For float64 leaves T is lower than that
    rule needs (``2**511``), so that the float64 sum of squares behind ``max_grad_norm``
    stays finite too (``2**960`` per element, up to ``2**62`` elements). docs/formulas.md,
    "What is guaranteed", has the proof and what it does not cover (Adam's L2 term
    ``wd * p`` with a huge ``p``). Every backend's ``nonfinite_leaf`` uses this value (the
    Numba and CUDA kernels through :func:`grad_limit_bits`).

    Examples
    --------
    >>> grad_limit(np.float32) == 2.0**63, grad_limit(np.float64) == 2.0**480
    (True, True)

    A float16 or bfloat16 gradient is checked as the float32 it is upcast to (float16's
    largest finite value, 65504, is far below the limit: only NaN and Inf count).
    """
    return math.ldexp(1.0, GRAD_LIMIT_EXP[compute_dtype(dtype)])


def square_bound(dtypes) -> float:
    """The smallest :func:`grad_limit` squared over leaves of ``dtypes``: a sum of squares of
    gradients below it proves every element finite and under its own limit (its square
    alone would reach it), so a step that computed the sum to clip needs no check pass.
    NaN, Inf and larger sums say nothing: those gradients are checked element by element.

    Examples
    --------
    >>> square_bound([np.float64, np.float16]) == 2.0**126, square_bound([np.float64]) == 2.0**960
    (True, True)
    """
    exps = {GRAD_LIMIT_EXP[compute_dtype(d)] for d in dtypes}
    return math.ldexp(1.0, 2 * min(exps, default=0))


def grad_limit_bits(dtype) -> int:
    """The bit pattern of :func:`grad_limit` as a (non-negative) integer of the dtype's width.

    For a float ``x`` of ``dtype``, ``bits(|x|) >= grad_limit_bits(dtype)`` exactly when
    ``x`` is NaN, Inf or ``|x| >= grad_limit(dtype)`` (the bits of a non-negative float are
    monotone in its value, and NaN and Inf lie above every finite value), so an integer max
    over ``bits & 0x7F...F`` decides it.

    Examples
    --------
    >>> hex(grad_limit_bits(np.float32)), hex(grad_limit_bits(np.float64))
    ('0x5f000000', '0x5df0000000000000')
    """
    dtype = np.dtype(dtype)
    return int(np.array(grad_limit(dtype), dtype).view(f"i{dtype.itemsize}"))


class KernelScalars(NamedTuple):
    """The values a kernel multiplies with, already rounded to the leaf dtype."""

    grad_scale: np.floating
    decay: np.floating
    weight_decay: np.floating
    lerp_weight: np.floating  # w = 1 - beta1
    lerp_keep: np.floating  # 1 - w, computed in the leaf dtype (torch's lerp for w >= 0.5)
    beta2: np.floating
    one_minus_beta2: np.floating
    neg_step_size: np.floating
    bc2_sqrt: np.floating
    eps: np.floating
    lerp_small: bool  # w < 0.5: m += w * (g - m); else m = g - (g - m) * (1 - w)


def kernel_scalars(s: StepScalars, dtype) -> KernelScalars:
    """Round the host scalars to ``dtype`` (float32 or float64)."""
    f = np.dtype(dtype).type
    w = f(s.lerp_weight)
    return KernelScalars(
        f(s.grad_scale),
        f(s.decay),
        f(s.weight_decay),
        w,
        f(1) - w,
        f(s.beta2),
        f(s.one_minus_beta2),
        f(s.neg_step_size),
        f(s.bc2_sqrt),
        f(s.eps),
        bool(abs(float(w)) < 0.5),
    )


#: What a backend's one-call step of a single leaf (``step_one``, :mod:`adamnp._small`)
#: returns: the leaf was updated; its gradient is non-finite (nothing written); two of the
#: leaf, its gradient and its moments share memory (nothing written).
SMALL_UPDATED, SMALL_NONFINITE, SMALL_SHARES_MEMORY = 0, 1, 2


class KernelFlags(NamedTuple):
    """The branches of :func:`adam_elem`, in the order every kernel takes them."""

    decoupled_decay: bool
    l2_decay: bool
    amsgrad: bool
    maximize: bool


def kernel_flags(s: StepScalars) -> KernelFlags:
    """The branch flags of step scalars ``s`` (plain bools)."""
    return KernelFlags(s.decoupled_decay, s.l2_decay, s.amsgrad, s.maximize)


def adam_elem(p, g, m, v, vmax, k, decoupled_decay, l2_decay, amsgrad, maximize):
    """One element of one step; returns the new ``(p, m, v, vmax)``.

    ``k`` is the step's :class:`KernelScalars` (rounded to the leaf dtype); the four flags
    are separate arguments (Numba's parallel alias analysis counts booleans inside a tuple as
    possible aliases), in this order on every backend. ``vmax`` is ignored (and returned
    unchanged) unless ``amsgrad``. NaN propagates as in ``np.maximum``.

    Examples
    --------
    The first step (t = 1, lr = 0.1, eps = 0) moves a parameter by lr against the gradient:

    >>> import adamnp
    >>> s = host_scalars(adamnp.adam(lr=0.1, eps=0.0), t=1, lr=0.1)
    >>> k = kernel_scalars(s, np.float64)
    >>> float(adam_elem(1.0, 0.5, 0.0, 0.0, 0.0, k, *kernel_flags(s))[0])
    0.9
    """
    g = g * k.grad_scale
    if maximize:
        g = -g
    if decoupled_decay:
        p = p * k.decay
    elif l2_decay:
        g = g + k.weight_decay * p
    if k.lerp_small:
        m = m + k.lerp_weight * (g - m)
    else:
        m = g - (g - m) * k.lerp_keep
    v = v * k.beta2 + (k.one_minus_beta2 * g) * g
    vv = v
    if amsgrad:
        if not (vmax != vmax) and (v > vmax or v != v):  # max with NaN propagation
            vmax = v
        vv = vmax
    d = math.sqrt(vv) / k.bc2_sqrt + k.eps
    p = p + (k.neg_step_size * m) / d
    return p, m, v, vmax
