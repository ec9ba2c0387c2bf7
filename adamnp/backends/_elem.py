"""The per-element Adam/AdamW math, written once.

:func:`adam_elem` is plain scalar Python: the Numba CPU backend compiles it with
``numba.njit(inline="always")`` and the CUDA backend with ``cuda.jit(device=True)``. It performs
exactly the operations of :func:`adamnp.backends.numpy.update_chunk`, in the same order, on
values of the leaf dtype; the scalar arguments come from
:func:`adamnp.backends._scalars.kernel_scalars` (same field order as ``KernelScalars``).
"""

from __future__ import annotations

import math


def adam_elem(
    p, g, m, v, vmax,
    grad_scale, decay, weight_decay, lerp_weight, lerp_keep, beta2, one_minus_beta2,
    neg_step_size, bc2_sqrt, eps, lerp_small,
    decoupled_decay, l2_decay, amsgrad, maximize,
):  # fmt: skip
    """One element of one step; returns the new ``(p, m, v, vmax)``.

    ``vmax`` is ignored (and returned unchanged) unless ``amsgrad``. NaN propagates as in
    ``np.maximum``.

    Examples
    --------
    The first step (t = 1, lr = 0.1, no eps) moves a parameter by lr against the gradient:

    >>> adam_elem(1.0, 0.5, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.1, 0.9, 0.999, 0.001,
    ...           -0.1 / 0.1, math.sqrt(0.001), 0.0, True, False, False, False, False)[0]
    0.9
    """
    g = g * grad_scale
    if maximize:
        g = -g
    if decoupled_decay:
        p = p * decay
    elif l2_decay:
        g = g + weight_decay * p
    if lerp_small:
        m = m + lerp_weight * (g - m)
    else:
        m = g - (g - m) * lerp_keep
    v = v * beta2 + (one_minus_beta2 * g) * g
    vv = v
    if amsgrad:
        if not (vmax != vmax) and (v > vmax or v != v):  # max with NaN propagation
            vmax = v
        vv = vmax
    d = math.sqrt(vv) / bc2_sqrt + eps
    p = p + (neg_step_size * m) / d
    return p, m, v, vmax
