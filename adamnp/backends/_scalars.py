"""Per-step scalars: computed once on the host in float64, cast once to the leaf dtype.

Every backend takes its kernel scalars from :func:`kernel_scalars`, so all backends round the
host values to float32 in exactly the same way.
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


def host_scalars(config, t: int, lr: float, grad_scale: float = 1.0) -> StepScalars:
    """Scalars of step ``t`` (1-based) at learning rate ``lr``, in float64 as torch does."""
    b1, b2 = config.betas
    wd = config.weight_decay
    bc1 = 1.0 - b1**t
    bc2 = 1.0 - b2**t
    return StepScalars(
        grad_scale=float(grad_scale),
        decay=1.0 - lr * wd,
        weight_decay=wd,
        lerp_weight=1.0 - b1,
        beta2=b2,
        one_minus_beta2=1.0 - b2,
        neg_step_size=-(lr / bc1),
        bc2_sqrt=math.sqrt(bc2),
        eps=config.eps,
        decoupled_decay=config.decoupled and wd != 0.0,
        l2_decay=(not config.decoupled) and wd != 0.0,
        amsgrad=config.amsgrad,
        maximize=config.maximize,
        step=int(t),
    )


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
